import pytest

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.checkpoint import CheckpointError
from flashu_compile.models.showo2.embedded import verify_checksums
from flashu_compile.scenes.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "weights"
    log = train(minutes=0.05, out=out, batch=4)
    return out, log


def test_short_run_writes_loadable_verified_weights(trained):
    out, log = trained
    assert log["steps"] >= 1 and len(log["flow"]) == log["steps"] == len(log["ntp"])
    verify_checksums(out)
    model = Showo2.from_pretrained(str(out))
    assert model.tokenizer is not None and model.codec is not None  # scene tokenizer and pixel codec
    assert (out.parent / "weights-losses.png").stat().st_size > 1000


def test_tampered_weights_fail_the_checksum(trained):
    out, _ = trained
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum mismatch for .*model.safetensors"):
        verify_checksums(out)


def test_an_answer_only_run_logs_only_the_answer_loss(tmp_path):
    log = train(minutes=0.02, out=tmp_path / "weights", batch=0, answer_batch=4)
    assert log["steps"] >= 1 and log["flow"] == [] and len(log["ntp"]) == log["steps"]
    with pytest.raises(ValueError, match="not both 0"):
        train(minutes=0.01, out=tmp_path / "none", batch=0, answer_batch=0)
