"""Where multiplications go wrong: greedy completions of the multiply task's held-out problems, each compared step
by step with the worked product the cold start demonstrates (rlvr_fast/tasks/multiply.py: first_wrong_step).

    python bench/multiply_errors.py --digits 4 2 RUN/cold-start RUN/checkpoint-30 OTHER_RUN/checkpoint-150 \\
        --labels "cold start" GRPO "supervised control"

Per model: held-out accuracy, the share of problems whose first wrong step is of each kind (a digit product such as
`4*8+5=37`, a partial product's result, a column of the running sum, the running sum's result, the answer line, or
a completion that leaves the worked form or stops early), and accuracy by how many steps add a carried digit. It tells
what limits a recipe, and what GRPO fixed that supervised steps did not. The table goes to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table, publish  # noqa: E402

CARRY_BINS = ((0, 2), (3, 4), (5, 6), (7, 99))


def completions(model_dir: Path, problems: list) -> list[str]:
    import rlvr_fast
    from rlvr_fast.grpo.precision import pick_dtype
    from rlvr_fast.rollout import RolloutEngine, SamplingParams
    model, tok = rlvr_fast.load_pretrained(model_dir, dtype=pick_dtype("auto", torch.device("cpu")))
    engine = RolloutEngine(model.eval(), tok)
    prompts = [tok.encode(tok.apply_chat_template(p.messages, add_generation_prompt=True), add_special_tokens=False)
               for p in problems]
    with torch.no_grad():
        out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=256))
    return [group[0].text for group in out]


def error_row(label: str, texts: list[str], problems: list) -> list[str]:
    from rlvr_fast.tasks.multiply import STEP_KINDS, carries, first_wrong_step
    pairs = [(p.meta["a"], p.meta["b"]) for p in problems]
    kinds = [first_wrong_step(t, a, b) for t, (a, b) in zip(texts, pairs)]
    counts, n = Counter(kinds), len(kinds)
    row = [label, f"{counts['right'] / n:.3f}"]
    row += [f"{counts[k] / n:.3f}" for k in (*STEP_KINDS, "cut short", "other form")]
    for lo, hi in CARRY_BINS:
        mine = [k == "right" for k, (a, b) in zip(kinds, pairs) if lo <= carries(a, b) <= hi]
        row.append(f"{sum(mine) / len(mine):.2f} ({len(mine)})" if mine else "-")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="HF-layout model directories (a run's cold-start, "
                                                             "checkpoint-N)")
    parser.add_argument("--labels", nargs="+", help="one name per model (default: the directories' paths)")
    parser.add_argument("--digits", nargs=2, type=int, default=(4, 2))
    parser.add_argument("--eval-size", type=int, default=128, help="held-out problems (the runs' --eval-size)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not write RESULTS.md")
    args = parser.parse_args()
    labels = args.labels or [str(m) for m in args.models]
    if len(labels) != len(args.models):
        raise SystemExit(f"--labels: {len(labels)} names for {len(args.models)} models")
    from rlvr_fast.tasks.multiply import STEP_KINDS, MultiplyTask
    problems = MultiplyTask(digits=tuple(args.digits), curriculum=False, eval_size=args.eval_size).eval_problems()
    rows = [error_row(label, completions(m, problems), problems) for label, m in zip(labels, args.models)]
    header = ["model", "accuracy", *(f"first wrong: {k}" for k in STEP_KINDS), "cut short", "other form",
              *(f"accuracy, {lo}-{hi} carries" if hi < 99 else f"accuracy, {lo}+ carries" for lo, hi in CARRY_BINS)]
    body = (markdown_table(header, rows) + f"\n\n{len(problems)} held-out {args.digits[0]} x {args.digits[1]} problems "
            "(the runs' evaluation set), greedy. Each completion is compared step by step with the worked product the "
            "cold start demonstrates; the shares give where the first wrong step is (they and the accuracy add up to 1). "
            "Carries: steps of the worked product that add a carried digit (problems in brackets). Models: "
            + "; ".join(f"{label}: `{m}`" for label, m in zip(labels, args.models)))
    title = f"Learning multiplication {args.digits[0]}x{args.digits[1]}: where the errors are (multiply_errors)"
    publish(title, body, "cpu", write=not args.no_write, method=f"greedy, max 256 new tokens; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
