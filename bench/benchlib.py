"""Shared bench helpers: options, timing, peak memory, measuring children, the results file.

Measurements run in child processes (one per mode for time, one per variant and mode for memory):

* time: all variants of a mode are built in one process, warmed up, then called interleaved,
  round after round; median per variant (CUDA: synchronized). Interleaving makes background load
  (a shared 2-core CPU) hit every variant alike, so the ratios between them stay meaningful.
* peak extra memory, CUDA: torch.cuda.max_memory_allocated() during one call minus the memory
  allocated before it (inputs excluded, outputs and gradients included).
* peak extra memory, CPU: peak resident set size during one call minus the RSS before it. The
  child resets the kernel's high-water mark (write "5" to /proc/self/clear_refs) after set-up
  and warm-up, then reads VmHWM - VmRSS. It runs with MALLOC_MMAP_THRESHOLD_=65536 so that every
  large buffer is its own mmap and goes back to the OS when freed (no allocator cache hiding or
  inflating the peak); timing runs in a separate child without that setting.

A bench whose children do more than time one call (a whole trainer step, a test run) starts them with
`run_child` and answers from them with `emit`: one marked JSON line on stdout.

Results go to bench/RESULTS.md through `append_results` (or `publish`), never typed by hand. RESULTS.md
holds the latest section of each benchmark (its title) per machine kind (the GPU's name, else the CPU
model and core count); a new run replaces the older section in place, and the replaced one is appended
to bench/RESULTS-history.md. `python bench/benchlib.py --tidy` re-applies that rule to a RESULTS.md
whose sections were appended another way (e.g. by a merge).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlvr_fast.grpo.memory import peak_memory_bytes, peak_memory_scope, reset_peak_memory, status_kib

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HISTORY = RESULTS.with_name("RESULTS-history.md")
RESULTS_HEAD = ("# Benchmark results\n\nWritten by the scripts in bench/ (never by hand): the latest run of each "
                "benchmark per machine kind (GPU name, else CPU model and cores). Older runs: "
                "[RESULTS-history.md](RESULTS-history.md).\n\n")
HISTORY_HEAD = ("# Benchmark results: history\n\nSections of RESULTS.md replaced by a newer run of the same benchmark "
                "on the same machine kind, in the order they were replaced. Written by bench/benchlib.py.\n\n")
MEMORY_METHOD = {
    "cuda": "peak extra memory = torch.cuda.max_memory_allocated() during one call minus allocated before it",
    "cpu": "peak extra memory = peak RSS (VmHWM, reset via /proc/self/clear_refs) during one call minus RSS "
           "before it, each variant in a fresh process with MALLOC_MMAP_THRESHOLD_=65536",
}
RESULT_MARK = "BENCH_RESULT "  # the line of a child's stdout that carries its answer (emit / run_child)


# ----------------------------------------------------------------------------- options


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model DIR and --random-model SHAPE (see bench_model)."""
    p.add_argument("--model", type=Path, help="an HF-layout checkpoint directory of a supported family "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--random-model", metavar="SHAPE", help="build a random-weight bf16 checkpoint of "
                   "bench/shapes.py's SHAPE (e.g. qwen3-0.6b) in a temporary directory and use that")


@contextlib.contextmanager
def bench_model(args: argparse.Namespace) -> Iterator[tuple[Path, str]]:
    """(checkpoint directory, its name for a results table) from --model / --random-model; a random model's
    directory is removed when the block ends."""
    import tempfile

    from shapes import SHAPES, describe, write_random_checkpoint

    if args.model and args.random_model:
        raise SystemExit("--model and --random-model both name the model: give one")
    if args.random_model:
        if args.random_model not in SHAPES:
            raise SystemExit(f"--random-model {args.random_model!r}: not a shape of bench/shapes.py "
                             f"({', '.join(SHAPES)})")
        with tempfile.TemporaryDirectory(prefix="bench_random_model_") as tmp:
            path = write_random_checkpoint(args.random_model, Path(tmp) / args.random_model)
            yield path, f"{args.random_model} random weights ({describe(SHAPES[args.random_model])})"
        return
    if args.model:
        if not (args.model / "config.json").is_file():
            raise SystemExit(f"--model {args.model}: no config.json there; give a Hugging Face-layout checkpoint "
                             "directory")
        yield args.model.resolve(), f"{args.model.resolve().name} ({args.model})"
        return
    from rlvr_fast.checkpoint.default_model import default_model_dir
    yield default_model_dir(), "SmolLM2-135M-Instruct (default model)"


def add_no_write(p: argparse.ArgumentParser) -> None:
    """--no-write (also spelled --no-append): print the results without recording them in RESULTS.md."""
    p.add_argument("--no-write", "--no-append", dest="no_write", action="store_true",
                   help="print the results without writing them into bench/RESULTS.md")


def bench_parser(doc: str, variants: list[str] | None = None,
                 reps: tuple[int, int] = (10, 3)) -> argparse.ArgumentParser:
    """The options of every bench built on run_all: --dtype (bf16 on CUDA, fp32 on CPU), --reps (reps[0] on
    CUDA, reps[1] on CPU), --variants (when given the bench's variants) and --no-write. The bench reads them
    with parse_known_args: its children get run_all's --child arguments too."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--reps", type=int, default=reps[0] if cuda else reps[1], help="timed calls per variant")
    if variants:
        p.add_argument("--variants", default=",".join(variants), help="comma-separated subset")
    add_no_write(p)
    return p


# ----------------------------------------------------------------------------- time and memory


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(into: list[float], device: str | torch.device = "cpu") -> Iterator[None]:
    """Append the wall seconds of the with-block to `into` (on CUDA synchronized before and after)."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    into.append(time.perf_counter() - t0)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds of every call of each fn, the fns called in turns for `rounds` rounds (warm them up first):
    background load on a shared machine then hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            with timed(times[name], device):
                fn()
    return times


def time_fn(fn: Callable[[], object], device: str | torch.device, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    return statistics.median(interleaved({"fn": fn}, reps, device)["fn"])


def memory_now(device: str | torch.device) -> int:
    """Bytes in use now: allocated on CUDA, else this process's resident set."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else status_kib("VmRSS") * 1024


def peak_extra_memory(fn: Callable[[], object], device: str | torch.device) -> int:
    """Bytes of extra memory at the peak of one call of fn (see the module docstring)."""
    device = torch.device(device)
    sync(device)
    reset_peak_memory(device)
    if peak_memory_scope(device) != "step":
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs is not writable): no per-call peak here")
    base = memory_now(device)
    out = fn()
    sync(device)
    peak = peak_memory_bytes(device) - base
    del out
    return peak


def lm_head_matmuls(h: torch.Tensor, w: torch.Tensor, backward: bool = True) -> Callable[[], object]:
    """The bare GEMMs of any op on an lm-head (hidden h [..., H], weight w [V, H]): h @ w.T and, with the
    backward, its two gradient products (the [N, V] logits stand in for their gradient): the floor."""
    hd, wd = h.detach().reshape(-1, h.shape[-1]), w.detach()
    if not backward:
        return lambda: hd @ wd.T
    logits = hd @ wd.T  # memory: counts the [N, V] gradient operand as set-up, like any method's inputs
    return lambda: (hd @ wd.T, logits @ wd, logits.T @ hd)


# ----------------------------------------------------------------------------- children


def emit(result: object) -> None:
    """A measuring child's answer to run_child: one marked JSON line on stdout."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_child(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
              label: str = "") -> dict:
    """Run a child (from the repository root, os.environ updated with `env`) and return what it emit()ted,
    plus wall_s. If it fails, times out or answers nothing: {"error": its last stderr line, "failed": how,
    "log": its stderr tail, "wall_s"}, the tail also printed."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                              timeout=timeout)
        out, err, why = proc.stdout, proc.stderr, f"failed (exit {proc.returncode})"
        if proc.returncode == -signal.SIGKILL:  # no traceback, no output: say what usually sends it
            why = "killed by SIGKILL (on Linux usually the out-of-memory killer: the case does not fit in RAM)"
    except subprocess.TimeoutExpired as exc:  # its output is bytes whatever text= says
        out, err, why = "", (exc.stderr or b"").decode(errors="replace"), f"timed out after {timeout:.0f} s"
        proc = None
    wall = time.perf_counter() - t0
    answers = [ln for ln in out.splitlines() if ln.startswith(RESULT_MARK)]
    if proc is None or proc.returncode != 0 or not answers:
        tail = err.strip().splitlines() or [f"{why}, no output"]
        print(f"  {label or ' '.join(cmd[1:3])} {why}:\n" + "\n".join(tail[-15:]), file=sys.stderr, flush=True)
        return {"error": tail[-1][:160], "failed": why, "log": "\n".join(tail[-25:]), "wall_s": wall}
    return {**json.loads(answers[-1][len(RESULT_MARK):]), "wall_s": wall}


def child(make: Callable[[str, str, str], tuple[Callable[[], object] | None, dict]]) -> None:
    """Entry point of a measuring child of run_all: argv = --child VARIANTS MODE WHAT DEVICE REPS.

    make(variant, mode, device) -> (the call to measure, info for the table) or (None, {"skip": why}).
    WHAT == "mem": one variant, one call, peak extra memory. WHAT == "time": all VARIANTS
    (comma-separated) built in this process and timed interleaved; median per variant.
    """
    i = sys.argv.index("--child")
    variants, mode, what, device, reps = sys.argv[i + 1:i + 6]
    fns, out = {}, {}
    for v in variants.split(","):
        fn, info = make(v, mode, device)
        if fn is None:
            out[v] = {"skip": info.get("skip", "n/a")}
            continue
        fn()  # warm-up (torch.compile compiles here)
        sync(device)
        fns[v], out[v] = fn, dict(info)
    if what == "mem":
        for v, fn in fns.items():
            out[v]["mem"] = peak_extra_memory(fn, device)
    else:
        for v, times in interleaved(fns, int(reps), device).items():
            out[v]["time"] = statistics.median(times)
    emit(out)


def main_or_child(main: Callable[[], object], make: Callable) -> None:
    """A run_all bench's `if __name__ == "__main__"`: measure as a child when run_all started it, else main()."""
    child(make) if "--child" in sys.argv else main()


class Results(dict):
    """run_all's answer: (variant, mode) -> {"time": s, "mem": bytes, ...} or {"skip": why}."""

    def of(self, variant: str, mode: str, key: str):
        """One figure, None where it was skipped, failed or not measured."""
        return self.get((variant, mode), {}).get(key)


def _measure(script: str, variants: list[str], mode: str, what: str, device: str, reps: int,
             extra: list[str], alone_on_failure: bool = False) -> dict:
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if what == "mem" and device == "cpu" else {}
    cmd = [sys.executable, script, *extra, "--child", ",".join(variants), mode, what, device, str(reps)]
    res = run_child(cmd, env, label=f"{os.path.basename(script)} {mode} {what}")
    res.pop("wall_s")
    if "error" in res and len(variants) > 1 and alone_on_failure:
        # One variant may not fit (or may crash) where the others would: time each in its own child, so
        # the others are still measured; not interleaved then ("alone": the caller's table says so).
        print(f"  {mode}: the interleaved run failed; timing each variant alone", file=sys.stderr, flush=True)
        alone = {v: _measure(script, [v], mode, what, device, reps, extra)[v] for v in variants}
        return {v: r if "skip" in r else {**r, "alone": True} for v, r in alone.items()}
    if "error" in res:
        return {v: {"skip": f"failed: {res['error'][:120]}"} for v in variants}
    return res


def run_all(script: str, variants: list[str], modes: list[str], device: str, reps: int, extra: list[str],
            memory: bool = True, alone_on_failure: bool = False) -> Results:
    """Per mode: one child timing all variants interleaved, then (memory=True) one fresh child per variant
    for its peak memory. alone_on_failure: if the interleaved child fails, time each variant in its own
    child and mark those results "alone" (for benches whose variants may not all fit in memory)."""
    results = Results()
    for mode in modes:
        t0 = time.perf_counter()
        timed_ = _measure(script, variants, mode, "time", device, reps, extra, alone_on_failure)
        for v in variants:
            res = dict(timed_.get(v, {"skip": "missing"}))
            if memory and "skip" not in res:
                res.update(_measure(script, [v], mode, "mem", device, reps, extra).get(v, {}))
            results[v, mode] = res
            print(f"  {v:>10} {mode:>7}: {res}", file=sys.stderr, flush=True)
        print(f"  ({mode}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return results


def run_pytest(tests: list[str], timeout: float | None = None) -> tuple[int | None, list[str], str]:
    """pytest -q on `tests` in a child, from the repository root: (exit status, None if it timed out; the
    FAILED / ERROR lines; pytest's last line)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = None, (exc.stdout or b"").decode(errors="replace")
    lines = out.strip().splitlines()
    return rc, [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))], (lines[-1] if lines else "(no output)")


def fixed_work(trainer_mod, all_groups: bool = True, ignore_eos: bool = True) -> list[str]:
    """In a measuring child: patch rlvr_fast.grpo.trainer so every step does a fixed amount of work, as a peer
    that does not skip does: all_groups trains the groups whose rewards tie too (zero advantage, where the
    trainer drops them), ignore_eos makes every completion max_new_tokens long. Returns notes for the table."""
    notes = []
    if all_groups:
        orig_adv = trainer_mod.group_advantages
        trainer_mod.group_advantages = lambda rewards, scale: (orig_adv(rewards, scale)[0],
                                                               torch.zeros(rewards.shape[0], dtype=torch.bool))
        notes.append("zero-std groups kept")
    if ignore_eos:
        orig_sp = trainer_mod.SamplingParams
        trainer_mod.SamplingParams = lambda *a, **kw: orig_sp(*a, **{**kw, "ignore_eos": True})
        notes.append("EOS ignored")
    return notes


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}x"


# ----------------------------------------------------------------------------- reporting


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"CPU {cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        desc = f"GPU {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB); " + desc
    return desc


def versions(*packages: str) -> str:
    """python, torch and triton versions, then those of `packages` (distribution names)."""
    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return ", ".join([f"python {platform.python_version()}", f"torch {torch.__version__}", f"triton {tv}",
                      *(f"{p} {of(p)}" for p in packages)])


class Wall:
    """Wall time and load average since it was made: what a timing on a possibly shared machine needs beside it."""

    def __init__(self) -> None:
        self.load, self.t0 = os.getloadavg(), time.perf_counter()

    def note(self) -> str:
        rounded = lambda load: tuple(round(x, 2) for x in load)  # noqa: E731
        return (f"Load average (1, 5, 15 min) at start {rounded(self.load)}, at end {rounded(os.getloadavg())}; "
                f"total {(time.perf_counter() - self.t0) / 60:.1f} min.")


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fwd_bwd_table(res: Results, variants: list[str], header_extra: list[str] = (),
                  row_extra: Callable[[str], list[str]] | None = None) -> str:
    """The table of the benches that time modes "fwd" and "fwdbwd": per variant time and peak extra memory of
    each, and the ratios to the "naive" variant, then the bench's own columns."""
    header = ["variant", "fwd ms", "fwd peak extra MiB", "fwd+bwd ms", "fwd+bwd peak extra MiB",
              "fwd time / naive", "fwd+bwd time / naive", "fwd+bwd memory / naive", *header_extra]
    rows = []
    for v in variants:
        if skip := res.of(v, "fwd", "skip"):
            rows.append([v, skip] + ["-"] * (len(header) - 2))
            continue
        t, m = (lambda mode: res.of(v, mode, "time")), (lambda mode: res.of(v, mode, "mem"))
        rows.append([v, fmt_ms(t("fwd")), fmt_mib(m("fwd")), fmt_ms(t("fwdbwd")), fmt_mib(m("fwdbwd")),
                     ratio(t("fwd"), res.of("naive", "fwd", "time")),
                     ratio(t("fwdbwd"), res.of("naive", "fwdbwd", "time")),
                     ratio(m("fwdbwd"), res.of("naive", "fwdbwd", "mem"), 3), *(row_extra(v) if row_extra else [])])
    return markdown_table(header, rows)


def append_results(title: str, body: str, device: str, method: str | None = None, packages: tuple[str, ...] = (),
                   results: Path = RESULTS, history: Path = HISTORY) -> str:
    """Record one section (machine, command, versions, date, tables) in bench/RESULTS.md, replacing the
    older section of the same title and machine kind (moved to RESULTS-history.md; see record_section).
    method: how the figures were measured, when not by run_all; packages: versions to name beside torch's."""
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = (f"## {title}\n\n"
               f"- date: {stamp}\n- machine: {machine()}\n- versions: {versions(*packages)}\n- command: `{cmd}`\n"
               f"- method: {method or 'median of interleaved timed calls after warm-up; ' + MEMORY_METHOD[device]}"
               f"\n\n{body}\n\n")
    record_section(section, results, history)
    return section


def publish(title: str, body: str, device: str, write: bool = True, **kw) -> None:
    """Print the section and record it in RESULTS.md (append_results' keywords), or print the body alone
    when not `write` (--no-write)."""
    print(append_results(title, body, device, **kw) if write else body, flush=True)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a run's JSONL file (metrics, eval, warnings ...); [] if it does not exist."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ----------------------------------------------------------------------------- RESULTS.md: latest per machine kind


def machine_kind(machine_desc: str) -> str:
    """The part of a `machine()` line that names the kind of machine: the GPU's name if it has one
    ('GPU NVIDIA H100 80GB HBM3 (79 GiB); CPU ...' -> 'NVIDIA H100 80GB HBM3'), else the CPU's core count
    ('CPU AMD EPYC, 2 cores' -> 'CPU, 2 cores'). Not the CPU model: the project's CI and development
    machines are 2-core CPUs of changing make, and a table from an older CPU would otherwise outlive the
    code it measured; the section still names the model."""
    desc = machine_desc.strip()
    if desc.startswith("GPU "):
        return desc[4:].split(" (", 1)[0].split(";", 1)[0].strip()
    cores = re.search(r"(\d+) cores?", desc)
    return f"CPU, {cores.group(1)} cores" if cores else desc.removeprefix("CPU ").strip()


def split_sections(text: str) -> tuple[str, list[str]]:
    """(the text before the first '## ' heading, the sections: each from its '## ' heading to the next)."""
    starts = [m.start() for m in re.finditer(r"^## ", text, flags=re.M)]
    if not starts:
        return text, []
    bounds = starts + [len(text)]
    return text[:starts[0]], [text[a:b].rstrip("\n") + "\n\n" for a, b in zip(bounds, bounds[1:])]


def section_key(section: str) -> tuple[str, str]:
    """(title, machine kind) of one section; sections with the same key are runs of the same benchmark."""
    lines = section.splitlines()
    title = lines[0].removeprefix("## ").strip()
    machine_line = next((ln for ln in lines if ln.startswith("- machine: ")), "- machine: unknown")
    return title, machine_kind(machine_line.removeprefix("- machine: "))


def record_section(section: str, results: Path = RESULTS, history: Path = HISTORY) -> None:
    """Put `section` into `results` in place of the older section(s) with the same section_key (appending
    it if there is none) and append the replaced ones to `history`."""
    head, sections = split_sections(results.read_text()) if results.exists() else (RESULTS_HEAD, [])
    key = section_key(section)
    replaced = [s for s in sections if section_key(s) == key]
    if replaced:
        at = next(i for i, s in enumerate(sections) if section_key(s) == key)
        sections = [section if i == at else s for i, s in enumerate(sections) if i == at or section_key(s) != key]
        if not history.exists():
            history.write_text(HISTORY_HEAD)
        with history.open("a") as f:
            f.write("".join(replaced))
    else:
        sections.append(section)
    results.write_text(head + "".join(sections))


def tidy_results(results: Path = RESULTS, history: Path = HISTORY) -> None:
    """Re-record every section of `results` in file order (oldest first), so that only the latest of each
    benchmark per machine kind stays; the others go to `history`. For a RESULTS.md whose sections were
    appended without record_section (a merge of two branches that both added runs)."""
    head, sections = split_sections(results.read_text())
    results.write_text(head)
    for section in sections:
        record_section(section, results, history)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tidy", action="store_true", help="keep only the latest section per benchmark and machine "
                                                        "kind in RESULTS.md, moving the rest to RESULTS-history.md")
    if ap.parse_args().tidy:
        tidy_results()
