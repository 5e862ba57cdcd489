"""Rollout throughput: RolloutEngine vs transformers' generate on the same model, prompts, n and lengths;
or (--backends) the engine on its native C++ ops vs on the PyTorch reference ops.

    python bench/bench_rollout.py                      # 2 and 8 multiply prompts x n=8 x 64 new tokens, fp32
    python bench/bench_rollout.py --prompts 2 --n 8 --max-new-tokens 64 --reps 3 --no-write
    python bench/bench_rollout.py --dtype bfloat16 --prompts 2 8 --reps 2 --backends --no-write
    python bench/bench_rollout.py --model DIR          # any supported HF-layout checkpoint (default: SmolLM2-135M)
    python bench/bench_rollout.py --random-model qwen3-0.6b --dtype bfloat16 --prompts 8 --no-write
                                                       # random weights, Qwen3-0.6B's shapes, built on the spot

--random-model SHAPE writes a random-weight checkpoint of bench/shapes.py's SHAPE (bf16, the small test
tokenizer) into a temporary directory and benchmarks that: real widths and vocabulary, no download.

Both sides do the same work: EOS is ignored (engine: ignore_eos; transformers: min_new_tokens =
max_new_tokens), plain temperature sampling (transformers: top_k=0, top_p=1, num_return_sequences=n).
Prompts are chat-templated multiplication questions (the GRPO task), different operands per prompt.
The two are timed alternately in one process, round after round, so background load on a shared
machine hits both alike; the table reports the median of each. Tokens/s counts generated tokens.

--backends (CPU): the same engine and model, once with the rollout ops (KV write, paged decode
attention, sampling) on torch.ops.rlvr_fast.* (csrc/, needs the built extension) and once on the
PyTorch reference ops (kernels/paged_reference.py), picked per call with kernels._common.cpu_backend;
everything else (projections, norms, rotary) is the same code in both. Same alternation and medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (add_model_options, add_no_write, bench_model, default_device, interleaved,  # noqa: E402
                      markdown_table, publish)

import rlvr_fast  # noqa: E402
from rlvr_fast import RolloutEngine, SamplingParams  # noqa: E402
from rlvr_fast.kernels._common import cpu_backend  # noqa: E402
from rlvr_fast.kernels.native import HAS_NATIVE, WHY_NOT  # noqa: E402

QUESTION = ("Please answer the following question. You may write out your argument before stating your final answer "
            "X in a new line, following the format \"Final Answer: the final answer is X. I hope it is correct.\" "
            "{a} * {b}")
OPERANDS = [(1497, 63), (2384, 71), (5126, 38), (9043, 57), (3318, 92), (7705, 14), (6631, 29), (4289, 86)]


def prompts(tok, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        a, b = OPERANDS[i % len(OPERANDS)]
        text = tok.apply_chat_template([{"role": "user", "content": QUESTION.format(a=a, b=b)}])
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def hf_generate(hf, ids: list[list[int]], n: int, new_tokens: int, temperature: float, pad: int) -> int:
    """transformers' generate doing the engine's work: plain temperature sampling, n samples per prompt of exactly
    new_tokens each (EOS ignored), prompts left-padded with `pad`. Returns the number of tokens generated."""
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                          num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=pad)
    return (out.shape[1] - width) * out.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", action="store_true",
                    help="CPU: time the engine on the native ops vs on the PyTorch reference ops "
                         "(instead of vs transformers)")
    add_model_options(ap)
    add_no_write(ap)
    args = ap.parse_args()
    if args.backends and args.device != "cpu":
        ap.error("--backends compares the CPU rollout ops: use --device cpu")
    if args.backends and not HAS_NATIVE:
        ap.error(f"--backends needs the native CPU ops, which are {WHY_NOT}")
    with bench_model(args) as (model_dir, model_name):
        run(args, model_dir, model_name)


def run(args: argparse.Namespace, model_dir: Path, model_name: str) -> None:
    """Time the engine against transformers (or its two op backends) on the checkpoint in model_dir."""

    dtype = getattr(torch, args.dtype)
    model, tok = rlvr_fast.load_pretrained(model_dir, device=args.device, dtype=dtype)
    hf = None
    if not args.backends:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    engine = RolloutEngine(model, tok)

    rows = []
    for count in args.prompts:
        ids = prompts(tok, count)
        params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=True)

        def run_engine(ops: str | None = None) -> int:
            with cpu_backend(ops):  # None: the default choice ("auto")
                out = engine.generate(ids, params, n=args.n)
            return sum(len(c.token_ids) for g in out for c in g)

        def run_hf() -> int:
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            return hf_generate(hf, ids, args.n, args.max_new_tokens, args.temperature, pad)

        want = count * args.n * args.max_new_tokens
        shape = f"{count} x {args.n} x {args.max_new_tokens}"
        if args.backends:
            names = ("native", "torch")
            fns = {"native": lambda: run_engine("native"), "torch": lambda: run_engine("torch")}
        else:
            names = ("engine", "transformers")
            fns = {"engine": run_engine, "transformers": run_hf}
        for name, fn in fns.items():  # warm-up
            if fn() != want:
                raise RuntimeError(f"{name} generated the wrong number of tokens (not {want})")
        times = interleaved(fns, args.reps, args.device)
        fast, ref = (statistics.median(times[name]) for name in names)
        st = engine.stats
        rows.append([shape, f"{want / fast:.0f}", f"{want / ref:.0f}", f"{ref / fast:.2f}x", f"{fast:.2f}",
                     f"{ref:.2f}", f"{st.prefill_steps} + {st.decode_steps}", str(st.preemptions)])
        runs = ", ".join(f"{name} {[round(t, 2) for t in times[name]]}" for name in names)
        print(f"{count} prompts: {names[0]} {want / fast:.0f} tok/s, {names[1]} {want / ref:.0f} tok/s "
              f"({ref / fast:.2f}x); runs {runs}", file=sys.stderr, flush=True)

    setup = (f"{model_name}, {args.dtype}, device {args.device}"
             + (f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else "")
             + f", temperature {args.temperature}, EOS ignored, medians of {args.reps} alternating runs. RolloutEngine "
             f"defaults (block size {engine.block_size}, {engine.num_blocks} KV blocks)")
    if args.backends:
        title = "Rollout engine: native CPU ops vs PyTorch reference ops"
        header = ["prompts x n x new tokens", "native ops tok/s", "torch ops tok/s", "native / torch", "native s",
                  "torch s"]
        body = (f"{setup}; the rollout ops (KV write, paged decode attention, sampling) from csrc/ "
                "(torch.ops.rlvr_fast) vs kernels/paged_reference.py, the rest of the engine identical.")
    else:
        title = "Rollout engine vs transformers generate"
        header = ["prompts x n x new tokens", "engine tok/s", "transformers tok/s", "speedup", "engine s",
                  "transformers s"]
        body = (f"{setup}; transformers generate with num_return_sequences={args.n}, "
                "min_new_tokens=max_new_tokens.")
    if args.model or args.random_model:  # its own section: the default model's table stays beside it
        title += f" ({args.random_model or Path(args.model).name})"
    header += ["engine steps (prefill + decode)", "preemptions"]
    body += " No memory measured by this script.\n\n" + markdown_table(header, rows)
    publish(title, body, "cuda" if args.device == "cuda" else "cpu", not args.no_write)


if __name__ == "__main__":
    main()
