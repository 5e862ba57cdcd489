"""Rollout throughput: RolloutEngine vs transformers' generate on the same model, prompts, n and lengths.

    python bench/bench_rollout.py                      # 2 and 8 multiply prompts x n=8 x 64 new tokens, fp32
    python bench/bench_rollout.py --prompts 2 --n 8 --max-new-tokens 64 --reps 3 --no-append

Both sides do the same work: EOS is ignored (engine: ignore_eos; transformers: min_new_tokens =
max_new_tokens), plain temperature sampling (transformers: top_k=0, top_p=1, num_return_sequences=n).
Prompts are chat-templated multiplication questions (the GRPO task), different operands per prompt.
The two are timed alternately in one process, round after round, so background load on a shared
machine hits both alike; the table reports the median of each. Tokens/s counts generated tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, markdown_table  # noqa: E402

import rlvr_fast  # noqa: E402
from rlvr_fast import RolloutEngine, SamplingParams  # noqa: E402

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


def hf_generate(hf, tok, ids: list[list[int]], n: int, new_tokens: int, temperature: float) -> int:
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
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
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-append", action="store_true", help="print the table only")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from rlvr_fast.checkpoint.default_model import default_model_dir

    dtype = getattr(torch, args.dtype)
    model, tok = rlvr_fast.load_pretrained(device=args.device, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype).to(args.device).eval()
    engine = RolloutEngine(model, tok)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    rows = []
    for count in args.prompts:
        ids = prompts(tok, count)
        params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=True)

        def run_engine() -> int:
            out = engine.generate(ids, params, n=args.n)
            return sum(len(c.token_ids) for g in out for c in g)

        def run_hf() -> int:
            return hf_generate(hf, tok, ids, args.n, args.max_new_tokens, args.temperature)

        want = count * args.n * args.max_new_tokens
        times: dict[str, list[float]] = {"engine": [], "transformers": []}
        for name, fn in (("engine", run_engine), ("transformers", run_hf)):  # warm-up
            assert fn() == want, f"{name} generated the wrong number of tokens"
        for _ in range(args.reps):
            for name, fn in (("engine", run_engine), ("transformers", run_hf)):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        eng, ref = statistics.median(times["engine"]), statistics.median(times["transformers"])
        st = engine.stats
        rows.append([f"{count} x {args.n} x {args.max_new_tokens}", f"{want / eng:.0f}", f"{want / ref:.0f}",
                     f"{ref / eng:.2f}x", f"{eng:.2f}", f"{ref:.2f}",
                     f"{st.prefill_steps} + {st.decode_steps}", str(st.preemptions)])
        print(f"{count} prompts: engine {want / eng:.0f} tok/s, transformers {want / ref:.0f} tok/s "
              f"({ref / eng:.2f}x); runs engine {[round(t, 2) for t in times['engine']]}, "
              f"transformers {[round(t, 2) for t in times['transformers']]}", file=sys.stderr, flush=True)

    table = markdown_table(
        ["prompts x n x new tokens", "engine tok/s", "transformers tok/s", "speedup", "engine s", "transformers s",
         "engine steps (prefill + decode)", "preemptions"], rows)
    body = (f"SmolLM2-135M-Instruct (default model), {args.dtype}, device {args.device}, temperature "
            f"{args.temperature}, EOS ignored, medians of {args.reps} alternating runs. RolloutEngine defaults "
            f"(block size {engine.block_size}, {engine.num_blocks} KV blocks); transformers generate with "
            f"num_return_sequences={args.n}, min_new_tokens=max_new_tokens. No memory measured by this script.\n\n"
            + table)
    if args.no_append:
        print(body)
    else:
        device = "cuda" if args.device == "cuda" else "cpu"
        print(append_results("Rollout engine vs transformers generate", body, device))


if __name__ == "__main__":
    main()
