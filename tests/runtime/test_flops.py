import torch
from torch.utils.flop_counter import FlopCounterMode

from flashu_compile.models.showo2.sampling import generate_latents
from flashu_compile.runtime import FlopTally, counted


def test_tally_counts_what_flop_counter_mode_counts(small_model):
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        generate_latents(small_model, small_model.tokenizer, ["a red circle"], steps=3, progress=False)
    with FlopTally() as tally:
        generate_latents(small_model, small_model.tokenizer, ["a red circle"], steps=3, progress=False,
                         denoise=counted(small_model.denoise))
    assert tally.calls == 2 and tally.total == mode.get_total_flops() > 0


def test_nothing_is_counted_outside_a_tally(small_model):
    fn = counted(lambda x: x @ x)
    assert torch.equal(fn(torch.eye(3)), torch.eye(3))
    with FlopTally() as tally:
        fn(torch.eye(3))
    assert tally.total == 2 * 27 and tally.calls == 1
