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

Results go to bench/RESULTS.md through `append_results`, never typed by hand. RESULTS.md holds the
latest section of each benchmark (its title) per machine kind (the GPU's name, else the CPU model and
core count); a new run replaces the older section in place, and the replaced one is appended to
bench/RESULTS-history.md. `python bench/benchlib.py --tidy` re-applies that rule to a RESULTS.md whose
sections were appended another way (e.g. by a merge).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
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


def append_results(title: str, body: str, device: str, method: str | None = None,
                   results: Path = RESULTS, history: Path = HISTORY) -> str:
    """Record one section (machine, command, versions, date, tables) in bench/RESULTS.md, replacing the
    older section of the same title and machine kind (moved to RESULTS-history.md; see record_section).
    method: how the figures were measured, when not by the interleaved timing above."""
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = (f"## {title}\n\n"
               f"- date: {stamp}\n- machine: {machine()}\n- versions: {versions()}\n- command: `{cmd}`\n"
               f"- method: {method or 'median of interleaved timed calls after warm-up; ' + MEMORY_METHOD[device]}"
               f"\n\n{body}\n\n")
    record_section(section, results, history)
    return section


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
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tidy", action="store_true", help="keep only the latest section per benchmark and machine "
                                                        "kind in RESULTS.md, moving the rest to RESULTS-history.md")
    if ap.parse_args().tidy:
        tidy_results()
