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

from flashu_compile.models.showo2.sampling import generate_latents, time_grid
from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.tasks import compile_tasks


def latent_noise(model, n, seed=0):
    """``n`` noise latents at the model's resolution, seeded."""
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def compiled_generate(model, options, prompts, steps, noise, guidance=5.0):
    """Latents from the ``flashu`` backend with ``options``."""
    torch._dynamo.reset()  # every example compiles a new backend; stay below dynamo's recompile limit
    compiled = compile_tasks(model, "flashu", options)
    return generate_latents(model, model.tokenizer, prompts, steps=steps, guidance=guidance, noise=noise,
                            progress=False, denoise=compiled.entries["denoise"], rules=compiled.rules)


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
                    guidance=any(s not in (0, 1) for s in scales))
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
        n = 2 * b if scales[k - 1] not in (0, 1) else b
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


def _rotate(x, positions, inv_freq):
    """RoPE at explicit positions (the flow head's tables, computed here from its inverse frequencies)."""
    angles = positions.float()[:, None] * inv_freq.float()[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _head_block(block, x, positions, inv_freq, past=None, adaln=None):
    """One flow-head block on ``x`` (1, n, D) at ``positions``, attending to ``past`` (k, v) and itself.

    The prefix (``adaln`` None) is causal and unmodulated; the span (``adaln`` the block's six
    chunks) is modulated and sees all of ``past`` and all of itself. Returns (x, (k, v)).
    """
    attn = block.self_attn
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = adaln if adaln is not None else (None,) * 6

    def modulate(h, shift, scale):
        return h if shift is None else (h.float() * (1 + scale.float()) + shift.float()).to(h.dtype)

    n, d = x.shape[1], attn.head_dim
    h = modulate(block.input_layernorm(x), shift_a, scale_a)
    q = attn.q_norm(attn.q_proj(h).view(1, n, -1, d).transpose(1, 2))
    k = attn.k_norm(attn.k_proj(h).view(1, n, -1, d).transpose(1, 2))
    v = attn.v_proj(h).view(1, n, -1, d).transpose(1, 2)
    q, k = _rotate(q, positions, inv_freq), _rotate(k, positions, inv_freq)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    groups = attn.num_heads // attn.num_kv_heads
    out = F.scaled_dot_product_attention(q, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1),
                                         is_causal=adaln is None)
    update = attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
    x = x + (update if gate_a is None else gate_a * update)
    update = block.mlp(modulate(block.post_attention_layernorm(x), shift_m, scale_m))
    return x + (update if gate_m is None else gate_m * update), (k, v)


@torch.no_grad()
def reference_prefix_generate(model, prompts, steps, guidance, noise, schedule=None):
    """Guided Euler sampling that computes each row's text prefix once and then only its image span.

    Per row: the prefix ``[bos] prompt [boi]`` runs causally through the LLM (into a KV cache) and
    the flow head (keys/values kept per block) on the first call that row is used; every call
    then embeds the time token and image tokens, runs them at their positions against the cached
    prefix with full attention inside the span, and reads v from the image tokens. The tail
    (eoi, eos, padding) is never computed.
    """
    from transformers import DynamicCache

    from flashu_compile.models.showo2.modeling import unpatchify

    cfg = model.config
    lm = model.showo.model
    calls = steps - 1
    scales = reference_scales(schedule, calls, guidance, "project")
    rows = t2i_rows(model.tokenizer, prompts, cfg.num_image_tokens, cfg.max_text_len,
                    guidance=any(s not in (0, 1) for s in scales))
    grid = time_grid(steps)
    span = cfg.num_image_tokens + 1
    prefixes = {}

    def prefix(r):
        if r not in prefixes:
            start = int(rows.time_positions[r])
            cache = DynamicCache(config=cfg.llm)
            hidden = lm(inputs_embeds=lm.embed_tokens(rows.text_tokens[r:r + 1, :start]), past_key_values=cache,
                        use_cache=True).last_hidden_state
            x, head = model.diff_proj(hidden), []
            for block in model.diffusion_head_a:
                x, kv = _head_block(block, x, torch.arange(start), model.head_inv_freq)
                head.append(kv)
            prefixes[r] = (start, cache, head)
        return prefixes[r]

    x = noise.float()
    b = x.shape[0]
    for k in range(1, calls + 1):
        t = grid[k - 1]
        n = 2 * b if scales[k - 1] not in (0, 1) else b
        latents = torch.cat([x, x]) if n > b else x
        time_embeds, time_tokens = model.time_embeddings(t.expand(n))
        image = model.image_features(latents)
        v = []
        for r in range(n):
            start, cache, head = prefix(r)
            positions = start + torch.arange(span)
            embeds = torch.cat([time_tokens[r:r + 1, None], image[r:r + 1]], 1)
            visible = torch.zeros(1, 1, span, start + span)
            hidden = lm(inputs_embeds=embeds, attention_mask=visible, position_ids=positions[None],
                        past_key_values=cache, use_cache=True).last_hidden_state
            cache.crop(-span)  # the prefix stays, this call's span goes
            h = model.diff_proj(hidden)
            for block, past in zip(model.diffusion_head_a, head, strict=True):
                adaln = [c[:, None] for c in block.adaLN_modulation(time_embeds[r:r + 1]).chunk(6, dim=-1)]
                h, _ = _head_block(block, h, positions, model.head_inv_freq, past, adaln)
            final = model.diffusion_head_b
            shift, scale = (c[:, None] for c in final.adaLN_modulation(time_embeds[r:r + 1]).chunk(2, dim=-1))
            out = final.linear((final.norm_final(h).float() * (1 + scale) + shift).to(h.dtype))
            grid_h, grid_w = cfg.latent_size[0] // cfg.patch_size, cfg.latent_size[1] // cfg.patch_size
            v.append(unpatchify(out[:, 1:], grid_h, grid_w, cfg.patch_size, cfg.image_latent_dim))
        v = torch.cat(v).float()
        if n > b:
            vc, vu = v.chunk(2)
            v = vu + scales[k - 1] * (vc - vu)
        x = x + (grid[k] - t) * v
    return x
