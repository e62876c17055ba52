"""Eager reference semantics of the generation passes, written independently of the compiler.

It patches the eager model the way the public FlashU code does (wrapped decoder layers, a
forward hook on the last flow-head block) and re-derives every step rule from the method
description, so the compiled program is checked against a second implementation.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from flashu_compile.models.showo2.sampling import time_grid
from flashu_compile.models.showo2.sequences import t2i_rows


def assert_close_rel(a, b, rel=1e-5):
    """Max-abs difference relative to the reference's largest magnitude."""
    scale = b.abs().max().clamp_min(1e-6)
    assert float((a - b).abs().max() / scale) <= rel, float((a - b).abs().max() / scale)


def reference_scales(schedule, calls, default, semantics):
    if not schedule:
        return [default] * calls
    if semantics == "flashu-reference":
        out = []
        for step in range(1, calls + 1):
            bound, scale = 0, default
            for n, s in schedule:
                bound += n
                if step <= bound:
                    scale = s
                    break
            out.append(scale)
        return out
    total = sum(n for n, _ in schedule)
    cum, out = 0, []
    for n, s in schedule:
        cum += n
        while len(out) < round(cum / total * calls):
            out.append(s)
    return out


@contextlib.contextmanager
def patched_layers(model, decide):
    """decide(index, hidden, run) -> output, for every decoder layer."""
    layers = model.showo.model.layers
    originals = [layer.forward for layer in layers]
    for i, layer in enumerate(layers):
        def forward(hidden_states, *args, _i=i, _orig=originals[i], **kwargs):
            return decide(_i, hidden_states, lambda: _orig(hidden_states, *args, **kwargs))
        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def zeroed_copy(model, keep):
    """A copy of ``model`` whose FFN neurons outside ``keep[l]`` (original numbering) are zero in
    gate/up rows and down columns: pruning by masking, the definition the pruned graph must meet."""
    out = copy.deepcopy(model)
    for layer, kept in zip(out.showo.model.layers, keep, strict=True):
        mlp = layer.mlp
        drop = torch.ones(mlp.gate_proj.out_features, dtype=torch.bool)
        drop[kept] = False
        mlp.gate_proj.weight[drop] = 0
        mlp.up_proj.weight[drop] = 0
        mlp.down_proj.weight[:, drop] = 0
    return out


@torch.no_grad()
def reference_generate(model, prompts, steps, guidance, noise, *, layer_skip=False, head_cache=False, phased=None,
                       semantics="project", tau=11, skip_interval=10, skip_ratio=0.2, cache_interval=5,
                       schedule=None, pruned=None):
    """Guided Euler sampling with the generation passes' step rules applied by hand.

    ``pruned`` (a :func:`zeroed_copy`) runs every step outside the final full-network phase.
    """
    cfg = model.config
    calls = steps - 1
    scales = reference_scales(schedule, calls, guidance, semantics)
    rows = t2i_rows(model.tokenizer, prompts, cfg.num_image_tokens, cfg.max_text_len,
                    guidance=any(s > 0 for s in scales))
    grid = time_grid(steps)
    phased = (layer_skip or head_cache or pruned is not None) if phased is None else phased
    L = len(model.showo.model.layers)
    skip, due, importance, cache, was_full = set(), False, {}, None, False
    x = noise.float()
    b = x.shape[0]
    for k in range(1, calls + 1):
        total = calls + 1 if semantics == "flashu-reference" else calls
        full = phased and tau > 0 and k > total - tau
        if full != was_full:
            cache, was_full = None, full
        if layer_skip and (k - 1) % skip_interval == 0:
            due, importance = True, {}
        elif due:
            importance = {}
        n = 2 * b if scales[k - 1] > 0 else b
        key = n
        have = cache is not None and cache[0] == key
        if full or not head_cache:
            action = "compute"
        elif semantics == "flashu-reference":
            action = "store" if k % cache_interval == 0 else ("reuse" if have else "compute")
        else:
            action = "store" if (k - 1) % cache_interval == 0 or not have else "reuse"
        llm_runs = action != "reuse" or (semantics == "flashu-reference" and due)
        measuring = layer_skip and due and not full and llm_runs

        # Defaults bind this step's state: the closures live for one step only.
        def decide(i, hidden, run, full=full, measuring=measuring, importance=importance, skip=skip):
            if full or not layer_skip:
                return run()
            if measuring:
                out = run()
                importance[i] = float(1 - F.cosine_similarity(hidden.float(), out.float(), dim=-1).mean())
                return out
            return hidden if i in skip else run()

        captured = {}

        def head_hook(module, args, output, captured=captured, cache=cache, action=action):
            captured["out"] = output
            return cache[1] if action == "reuse" else output

        net = pruned if pruned is not None and not full else model
        handle = net.diffusion_head_a[-1].register_forward_hook(head_hook)
        try:
            with patched_layers(net, decide):
                t = grid[k - 1]
                model_x = torch.cat([x, x]) if n > b else x
                v = net.denoise(rows.text_tokens[:n], model_x, t.expand(n), rows.attention_mask[:n],
                                  rows.modality_positions[:n]).float()
        finally:
            handle.remove()
        if action == "store":
            cache = (key, captured["out"])
        if measuring and len(importance) == L:
            order = sorted(importance, key=lambda i: (importance[i], i))
            skip, due = set(order[: int(L * skip_ratio)]), False
        if n > b:
            vc, vu = v.chunk(2)
            v = vu + scales[k - 1] * (vc - vu)
        x = x + (grid[k] - t) * v
    return x


@torch.no_grad()
def reference_token_drop_prefill(model, embeds, mask, image_positions, cache, layer, ratio, highest=True):
    """The prefill with V-Norm token dropping done by hand on the eager decoder layers.

    Layer ``layer`` and those before it see every token; its value vectors (L2 over head_dim,
    mean over KV heads) rank the image tokens, the int(ratio * N) highest (or lowest) are removed,
    and later layers run on the survivors with their original rotary positions and mask entries.
    Every layer writes its own tokens into ``cache``. Returns the last position's logits.
    """
    lm = model.showo.model
    seq = embeds.shape[1]
    positions = torch.arange(seq)[None]
    cos, sin = lm.rotary_emb(embeds, positions)
    hidden, keep = embeds, torch.arange(seq)
    for i, block in enumerate(lm.layers):
        values = block.self_attn.v_proj(block.input_layernorm(hidden))
        out = block(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions,
                    past_key_values=cache, use_cache=True)
        if i == layer:
            heads = lm.config.num_key_value_heads
            norms = values.view(1, seq, heads, -1).float().norm(dim=-1).mean(-1)[0]
            image = image_positions[0]
            n_drop = int(image.numel() * ratio)
            dropped = image[norms[image].topk(n_drop, largest=highest).indices]
            keep = torch.tensor([p for p in range(seq) if p not in set(dropped.tolist())])
            out, cos, sin = out[:, keep], cos[:, keep], sin[:, keep]
            mask, positions = mask[:, :, keep][:, :, :, keep], positions[:, keep]
        hidden = out
    return model.showo.lm_head(lm.norm(hidden)[:, -1])


@torch.no_grad()
def reference_answer(model, tokenizer, image, question, max_new_tokens, *, skip_ratio=0.0, drop=None):
    """Greedy answer with understanding layer skipping (and token dropping) done by hand.

    The prefill runs every layer and scores each by 1 - cos of its input and output at the last
    position; the int(L * skip_ratio) lowest-scoring layers other than layer 0 are then skipped
    (no call, so no KV entry) for every decoded token. ``drop`` = (layer, ratio, highest) runs
    :func:`reference_token_drop_prefill`. Returns (prefill logits, tokens, cache, skipped layers).
    """
    from transformers import DynamicCache

    from flashu_compile.models.showo2.understanding import decode_step, prefill, prepare

    rows, embeds = prepare(model, tokenizer, image, question)
    cache = DynamicCache(config=model.config.llm)
    importance = {}

    def measure(i, hidden, run):
        out = run()
        importance[i] = float(1 - F.cosine_similarity(hidden[:, -1].float(), out[:, -1].float(), dim=-1).mean())
        return out

    with patched_layers(model, measure):
        if drop is None:
            logits = prefill(model, embeds, rows.attention_mask, cache)
        else:
            logits = reference_token_drop_prefill(model, embeds, rows.attention_mask, rows.image_positions(), cache,
                                                  *drop)
    n_skip = int(len(model.showo.model.layers) * skip_ratio)
    skip = set(sorted((i for i in importance if i != 0), key=lambda i: (importance[i], i))[:n_skip])
    first, tokens = logits, []
    with patched_layers(model, lambda i, hidden, run: hidden if i in skip else run()):
        while len(tokens) < max_new_tokens and int(logits.argmax(-1)) != tokenizer.eos_id:
            tokens.append(int(logits.argmax(-1)))
            if len(tokens) < max_new_tokens:
                logits = decode_step(model, logits.argmax(-1), cache)
    return first, tokens, cache, skip
