"""Shared-prompt training attention: the new two-pass path vs plain packing and the old tree mask.

    python bench/bench_shared_prompt.py                               # CPU: layer and step, default sizes
    python bench/bench_shared_prompt.py --what layer --sizes 128x16x2048 --tree-max-tokens 40000

A size PxGxC is one prompt of P tokens with G completions of C tokens each (one GRPO group in one
micro-batch). Variants, all exact:
  plain   every completion packed with its own copy of the prompt (G sequences of P + C), varlen causal;
  tree    one segment [prompt, c1, ..., cG] with a dense [L, L] tree mask (the former default; now only
          model/attention_reference.py); skipped where L = P + G*C > --tree-max-tokens (minutes, GBs);
  shared  the shared-prompt path of model/attention.py (two passes merged by log-sum-exp on CPU,
          flash-attn / Triton varlen over gathered [prompt; own] keys on CUDA);
  flex    FlexAttention with the shared-prompt mask as a block mask (CUDA only: no CPU backward in torch 2.13).
What:
  layer   one attention op, forward + backward (q, k, v -> out, grads of q, k, v), SmolLM2-135M heads
          (9 query heads, 3 KV heads, head_dim 64);
  step    one training micro-step of the whole model, random weights of the default model's shape
          (SmolLM2-135M; --model 1b: Llama-3.2-1B's), forward_packed + fused GRPO loss + backward.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (bench_parser, default_device, fmt_mib, fmt_ms, main_or_child, markdown_table,  # noqa: E402
                      publish, ratio, run_all)
from shapes import random_model, shape  # noqa: E402

VARIANTS = ["plain", "tree", "shared", "flex"]
MODELS = {"135m": "smollm2-135m", "1b": "llama-3.2-1b"}  # --model -> bench/shapes.py (weights are random)


def parse():
    cuda = torch.cuda.is_available()
    p = bench_parser(__doc__, VARIANTS, reps=(5, 2))
    p.add_argument("--what", default="layer,step", help="layer, step or both (comma-separated)")
    p.add_argument("--sizes", default=None, help="PxGxC,... for the layer (default: P 128, 1024 x G 8, 16 x C 256, "
                   "1024, 2048" + (", 8192" if cuda else "") + ")")
    p.add_argument("--step-sizes", default=None, help="PxGxC,... for the step (default: the layer's on CUDA; "
                   "128x8x256,1024x8x256,128x8x1024,1024x8x1024 on CPU, where a full-size step takes minutes)")
    p.add_argument("--model", default="1b" if cuda else "135m", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the step's model (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in the measuring children (default: "
                   "torch's); 1 makes the comparison robust to other jobs on a shared machine")
    p.add_argument("--tree-max-tokens", type=int, default=9000, help="skip the tree mask above this group length")
    p.add_argument("--no-mem", action="store_true", help="time only (each CPU memory child re-runs the case with "
                   "every large buffer its own mmap, which takes minutes for a whole step on a busy machine)")
    p.add_argument("--label", default="", help="a note for the results section (e.g. 'CPU shared with other jobs')")
    return p.parse_known_args()[0]


def default_sizes(cuda: bool) -> list[str]:
    comps = [256, 1024, 2048] + ([8192] if cuda else [])
    return [f"{p}x{g}x{c}" for p in (128, 1024) for g in (8, 16) for c in comps]


def parse_size(size: str) -> tuple[int, int, int]:
    p, g, c = (int(x) for x in size.split("x"))
    return p, g, c


def batches(p: int, g: int, c: int, device: str):
    """The same G completions of one prompt as plain sequences and as one shared-prompt batch."""
    from rlvr_fast.model.attention import PackedBatch

    plain = PackedBatch.from_cu_seqlens(torch.arange(0, g + 1, dtype=torch.int32, device=device) * (p + c), p + c)
    shared = PackedBatch.shared_prompt([p], [[c] * g], device=device)
    return plain, shared


def flex_attention_fn(batch):
    """FlexAttention over the packed tokens with the shared-prompt mask as a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, dev = batch.positions.numel(), batch.positions.device
    seq = batch.seq_ids
    sp = batch.shared
    num_prompts = sp.num_prompts if sp is not None else 0
    prompt_of = seq.clone()  # a completion token's prompt index (prompt tokens: their own)
    if sp is not None:
        m_of_block = torch.repeat_interleave(torch.arange(num_prompts, device=dev),
                                             torch.tensor([sum(c) for c in sp.completion_lens], device=dev))
        prompt_of[sp.num_prompt_tokens:] = m_of_block
    is_prompt = seq < num_prompts

    def mask_mod(b, h, q_idx, kv_idx):
        own = (seq[q_idx] == seq[kv_idx]) & (kv_idx <= q_idx)
        return own | (~is_prompt[q_idx] & is_prompt[kv_idx] & (prompt_of[q_idx] == seq[kv_idx]))
    block_mask = create_block_mask(mask_mod, None, None, n, n, device=dev)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # [N, H, D] -> [1, H, N, D] and back
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)
    return run


def make(variant: str, mode: str, device: str):
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    what, size = mode.split(":")
    p, g, c = parse_size(size)
    if variant == "flex" and device != "cuda":
        return None, {"skip": "CUDA only"}
    if variant == "tree" and p + g * c > a.tree_max_tokens:
        return None, {"skip": f"skipped (group of {p + g * c} tokens > {a.tree_max_tokens}: minutes, GBs)"}
    dtype = getattr(torch, a.dtype)
    plain, shared = batches(p, g, c, device)
    batch = plain if variant == "plain" else shared
    torch.manual_seed(0)
    if what == "layer":
        from rlvr_fast.model.attention import varlen_causal_attention
        from rlvr_fast.model.attention_reference import tree_mask_attention

        fn = {"plain": varlen_causal_attention, "shared": varlen_causal_attention, "tree": tree_mask_attention}.get(variant)
        if variant == "flex":
            fn_flex = flex_attention_fn(batch)
            fn = lambda q, k, v, b: fn_flex(q, k, v)  # noqa: E731
        n = batch.positions.numel()
        q = torch.randn(n, 9, 64, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(n, 3, 64, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(n, 3, 64, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, 9, 64, device=device, dtype=dtype)

        def run():
            q.grad = k.grad = v.grad = None
            fn(q, k, v, batch).backward(grad)
        return run, {"tokens": n}
    return make_step(variant, batch, p, g, c, device, dtype, a)


def make_step(variant, batch, p, g, c, device, dtype, a):
    from rlvr_fast.grpo.batching import Sample, make_micro_batch
    from rlvr_fast.kernels import fused_linear_grpo_loss
    from rlvr_fast.model import attention as attn_mod
    from rlvr_fast.model.attention_reference import tree_mask_attention

    cfg = shape(MODELS[a.model], **({"num_hidden_layers": a.layers} if a.layers else {}))
    model = random_model(cfg, device, dtype).train()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (p,), generator=gen).tolist()
    samples = [Sample(prompt, torch.randint(3, 1000, (c + 1,), generator=gen).tolist(), float(i % 2) - 0.5, i, group=0)
               for i in range(g)]  # c + 1 tokens: c fed, as in the layer rows
    mb = make_micro_batch(samples, share_prompts=variant != "plain").to(device)
    packed = mb.packed_batch()
    if variant == "tree":
        attn_mod.shared_prompt_attention = lambda q, k, v, b: tree_mask_attention(q, k, v, b)
    elif variant == "flex":
        flex = flex_attention_fn(packed)
        attn_mod.shared_prompt_attention = lambda q, k, v, b: flex(q, k, v)

    def run():
        model.zero_grad(set_to_none=True)
        hidden = mb.gather(model.forward_packed(mb.input_ids, packed))
        b, t, h = hidden.shape
        loss, _ = fused_linear_grpo_loss(hidden, model.lm_head.weight, mb.targets, None, None, mb.advantages,
                                         mb.mask, beta=0.0)
        loss.backward()
    return run, {"tokens": mb.num_input_tokens}


def main():
    a = parse()
    device = default_device()
    variants = [v for v in a.variants.split(",") if v]
    sections = []
    for what in a.what.split(","):
        sizes = (a.sizes if what == "layer" else a.step_sizes) or ",".join(
            default_sizes(device == "cuda") if what == "layer" or device == "cuda"
            else ["128x8x256", "1024x8x256", "128x8x1024", "1024x8x1024"])
        modes = [f"{what}:{s}" for s in sizes.split(",")]
        # Plain packing of a long prompt can outgrow a CPU machine's RAM where sharing fits: then each
        # variant is timed in its own child, so the shared path is still measured.
        res = run_all(os.path.abspath(__file__), variants, modes, device, a.reps, sys.argv[1:], memory=not a.no_mem,
                      alone_on_failure=True)
        header = ["P x G x C"] + [f"{v} ms" for v in variants] + [f"{v} MiB" for v in variants] + \
                 ["shared vs plain (time)", "shared vs plain (mem)", "tree / shared (time)"]
        rows = []
        for mode in modes:
            r = {v: res[v, mode] for v in variants}
            t = {v: r[v].get("time") for v in variants}
            m = {v: r[v].get("mem") for v in variants}
            cell = lambda v, x: r[v]["skip"] if "skip" in r[v] else x  # noqa: E731
            timed = lambda v: fmt_ms(t[v]) + (" (alone)" if r[v].get("alone") else "")  # noqa: E731
            rows.append([mode.split(":")[1]] + [cell(v, timed(v)) for v in variants]
                        + [cell(v, fmt_mib(m[v])) for v in variants]
                        + [ratio(t.get("plain"), t.get("shared")) + " faster", ratio(m.get("shared"), m.get("plain")),
                           ratio(t.get("tree"), t.get("shared"))])
        if what == "layer":
            desc = (f"One attention op, forward + backward, SmolLM2-135M heads (9 query, 3 KV, head_dim 64), {a.dtype}, "
                    f"{device}: one prompt of P tokens and G completions of C tokens.")
        else:
            layers = a.layers or shape(MODELS[a.model]).num_hidden_layers
            desc = (f"One training micro-step (forward_packed + fused GRPO loss + backward) of a {a.model} model shape "
                    f"with {layers} decoder layers, random weights, {a.dtype}, {device}: one prompt of P tokens and G "
                    f"completions of C tokens in one micro-batch.")
        desc += (" 'x faster' = plain time / shared time; memory ratio = shared / plain peak extra memory; "
                 "'tree / shared' = how many times slower the former tree-mask default is.")
        if any(res[v, mode].get("alone") for v in variants for mode in modes):
            desc += (" '(alone)': the interleaved timing of that size failed (a variant did not fit or crashed), so "
                     "each variant was timed in its own process, one after the other.")
        if a.threads:
            desc += f" torch.set_num_threads({a.threads})."
        if a.no_mem:
            desc += " Memory not measured (--no-mem)."
        if a.label:
            desc += f" Note: {a.label}."
        sections.append(f"{desc}\n\n" + markdown_table(header, rows))
    body = "\n\n".join(sections)
    publish(f"Shared-prompt training attention, {a.what}: shared vs plain packing vs tree mask", body, device,
            not a.no_write)


if __name__ == "__main__":
    main_or_child(main, make)
