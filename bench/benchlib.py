"""Shared bench helpers: timing, peak memory, one subprocess per measurement, the results file.

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

Results are appended to bench/RESULTS.md by `append_results`, never typed by hand.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from rlvr_fast.grpo.memory import status_kib as _status_kib

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MEMORY_METHOD = {
    "cuda": "peak extra memory = torch.cuda.max_memory_allocated() during one call minus allocated before it",
    "cpu": "peak extra memory = peak RSS (VmHWM, reset via /proc/self/clear_refs) during one call minus RSS "
           "before it, each variant in a fresh process with MALLOC_MMAP_THRESHOLD_=65536",
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_memory(fn: Callable[[], object], device: str) -> int:
    """Bytes of extra memory at the peak of one call of fn (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    out = fn()
    peak = (_status_kib("VmHWM") - base) * 1024
    del out
    return peak


# ----------------------------------------------------------------------------- parent / child


def child(make: Callable[[str, str, str], tuple[Callable[[], object] | None, dict]]) -> None:
    """Entry point of a measuring child: argv = --child VARIANTS MODE WHAT DEVICE REPS.

    WHAT == "mem": one variant, one call, peak extra memory. WHAT == "time": all VARIANTS
    (comma-separated) built in this process and timed interleaved, round after round, so that
    background load on the machine hits every variant alike; median per variant.
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
        times = {v: [] for v in fns}
        for _ in range(int(reps)):
            for v, fn in fns.items():
                times[v].append(time_fn(fn, device, warmup=0, reps=1))
        for v in fns:
            out[v]["time"] = statistics.median(times[v])
    print(json.dumps(out))


def _run_child(script: str, variants: list[str], mode: str, what: str, device: str, reps: int,
               extra: list[str]) -> dict:
    env = dict(os.environ)
    if what == "mem" and device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, script, *extra, "--child", ",".join(variants), mode, what, device, str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {v: {"skip": f"failed: {tail[:120]}"} for v in variants}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(script: str, variants: list[str], modes: list[str], device: str, reps: int,
            extra: list[str]) -> dict[tuple[str, str], dict]:
    """Per mode: one child timing all variants interleaved, then one fresh child per variant for memory."""
    results: dict[tuple[str, str], dict] = {}
    for mode in modes:
        t0 = time.perf_counter()
        timed = _run_child(script, variants, mode, "time", device, reps, extra)
        for v in variants:
            res = dict(timed.get(v, {"skip": "missing"}))
            if "skip" not in res:
                res.update(_run_child(script, [v], mode, "mem", device, reps, extra).get(v, {}))
            results[v, mode] = res
            print(f"  {v:>10} {mode:>7}: {res}", file=sys.stderr, flush=True)
        print(f"  ({mode}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return results


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


def versions() -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}"


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def append_results(title: str, body: str, device: str, method: str | None = None) -> str:
    """Append one section (machine, command, versions, date, tables) to bench/RESULTS.md.
    method: how the figures were measured, when not by the interleaved timing above."""
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = (f"## {title}\n\n"
               f"- date: {stamp}\n- machine: {machine()}\n- versions: {versions()}\n- command: `{cmd}`\n"
               f"- method: {method or 'median of interleaved timed calls after warm-up; ' + MEMORY_METHOD[device]}"
               f"\n\n{body}\n\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nWritten by the scripts in bench/ (never by hand); newest last.\n\n")
    with RESULTS.open("a") as f:
        f.write(section)
    return section
