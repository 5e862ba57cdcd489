"""bench/benchlib.py keeps bench/RESULTS.md at the latest run of each benchmark per machine kind: a new
section replaces the older one of the same title and machine kind in place, and the older one moves to
the history file. Its measuring children: a child that is killed is reported as such, and a bench whose
variants may not all fit in memory still measures the ones that do."""

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import benchlib  # noqa: E402


def section(title: str, machine: str, figure: str) -> str:
    return f"## {title}\n\n- date: d\n- machine: {machine}\n- command: `python x`\n\n| a |\n|---|\n| {figure} |\n\n"


CPU = "CPU AMD EPYC, 2 cores"
GPU = "GPU NVIDIA H100 80GB HBM3 (79 GiB); CPU AMD EPYC, 16 cores"


def test_machine_kind():
    assert benchlib.machine_kind(CPU) == "CPU, 2 cores"
    assert benchlib.machine_kind("CPU Intel(R) Xeon(R) Processor, 2 cores") == "CPU, 2 cores"
    assert benchlib.machine_kind(GPU) == "NVIDIA H100 80GB HBM3"
    assert benchlib.machine_kind(benchlib.machine()) != ""


def test_new_run_replaces_same_benchmark_and_machine_kind_in_place(tmp_path):
    results, history = tmp_path / "RESULTS.md", tmp_path / "RESULTS-history.md"
    for s in [section("a", CPU, "1"), section("b", CPU, "2"), section("a", GPU, "3")]:
        benchlib.record_section(s, results, history)
    assert not history.exists()
    benchlib.record_section(section("a", CPU, "4"), results, history)  # newer run of a on the CPU
    head, sections = benchlib.split_sections(results.read_text())
    assert head == benchlib.RESULTS_HEAD
    assert sections == [section("a", CPU, "4"), section("b", CPU, "2"), section("a", GPU, "3")]
    _, old = benchlib.split_sections(history.read_text())
    assert old == [section("a", CPU, "1")]
    benchlib.record_section(section("c", GPU, "5"), results, history)  # a new benchmark goes last
    assert benchlib.split_sections(results.read_text())[1][-1] == section("c", GPU, "5")


def test_tidy_keeps_latest_per_key_and_moves_the_rest(tmp_path):
    results, history = tmp_path / "RESULTS.md", tmp_path / "RESULTS-history.md"
    appended = [section("a", CPU, "1"), section("b", CPU, "2"), section("a", CPU, "3"), section("a", CPU, "4")]
    results.write_text("# title\n\nintro\n\n" + "".join(appended))  # as left by a merge of two logs
    benchlib.tidy_results(results, history)
    assert results.read_text() == "# title\n\nintro\n\n" + section("a", CPU, "4") + section("b", CPU, "2")
    assert benchlib.split_sections(history.read_text())[1] == [section("a", CPU, "1"), section("a", CPU, "3")]


def test_append_results_writes_through_record_section(tmp_path):
    results, history = tmp_path / "RESULTS.md", tmp_path / "RESULTS-history.md"
    first = benchlib.append_results("t", "| x |", "cpu", method="m", results=results, history=history)
    second = benchlib.append_results("t", "| y |", "cpu", method="m", results=results, history=history)
    assert benchlib.split_sections(results.read_text())[1] == [second]
    assert benchlib.split_sections(history.read_text())[1] == [first]


def test_learning_compare_tabulates_runs_from_their_files(tmp_path, monkeypatch):
    """bench_learning --compare reads each run's config.json, eval.jsonl and metrics.jsonl: the options that
    differ become columns, and the accuracy trail, gain and GRPO time come from the files."""
    import json

    import bench_learning
    from rlvr_fast.grpo.config import TrainConfig

    runs = []
    for name, lr, evals in [("a", 3e-5, [(0, 0.25, False), (3, 0.5, False)]),
                            # a run with its own cold start: the gain is GRPO's, from the evaluation after it
                            ("b", 1e-4, [(0, 0.0, False), (0, 0.25, True), (3, 0.125, False)])]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({**TrainConfig(lr=lr, beta=0.0).to_dict(), "output": str(run)}))
        (run / "eval.jsonl").write_text("".join(json.dumps({"step": s, "set": "target", "size": 8, "accuracy": a,
                                                            **({"after_cold_start": True} if c else {})}) + "\n"
                                                for s, a, c in evals))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "step_time_s": 30.0}) + "\n" for s in (1, 2, 3)))
        runs.append(run)
    published = []
    monkeypatch.setattr(bench_learning, "publish", lambda title, body, *a, **kw: published.append(body))
    bench_learning.compare(runs, "t")
    table = published[0]
    assert "| run | --lr | held-out accuracy by GRPO step | gain | GRPO steps' time |" in table
    assert "| a | 3e-05 | 0: 0.250, 3: 0.500 | +0.250 | 1.5 min (3 steps) |" in table
    assert "| b | 0.0001 | 0: 0.250, 3: 0.125 | -0.125 | 1.5 min (3 steps) |" in table
    assert "`beta=0.0`" in table  # shared and not the default


def test_readme_recommends_what_bench_learning_runs():
    """The README's 2x2 and 4x2 commands are the ones bench_learning measures (one recipe, two copies kept equal)."""
    import re
    import shlex
    from pathlib import Path

    import bench_learning

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [shlex.split(c.replace("\\\n", " ")) for c in
                re.findall(r"^python -m rlvr_fast\.train --task multiply --digits .*?(?<!\\)$", readme, re.M | re.S)]
    recommended = {f"{c[c.index('--digits') + 1]}x{c[c.index('--digits') + 2]}": c for c in commands}
    for size in ("2x2", "4x2"):
        options = recommended[size][recommended[size].index("--digits"):]
        pairs = lambda opts: sorted(" ".join(opts).replace(" --", "\n--").splitlines())  # noqa: E731
        assert pairs(options) == pairs(bench_learning.RUNS[size]), size


def killing_child(tmp_path: Path) -> str:
    """A run_all child that answers a time for its variants, or is SIGKILLed (as by the out-of-memory
    killer) when it is asked to build the variant 'big'."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(benchlib.__file__).parent)!r})
        from benchlib import emit
        variants = sys.argv[sys.argv.index("--child") + 1].split(",")
        if "big" in variants:
            os.kill(os.getpid(), signal.SIGKILL)
        emit({{v: {{"time": 0.5}} for v in variants}})
    """))
    return str(script)


def test_a_killed_variant_costs_only_its_own_figures_when_asked(tmp_path):
    script = killing_child(tmp_path)
    res = benchlib.run_all(script, ["small", "big"], ["m"], "cpu", 1, [], memory=False, alone_on_failure=True)
    assert res["small", "m"] == {"time": 0.5, "alone": True}  # timed in its own child, and marked so
    assert "killed by SIGKILL" in res["big", "m"]["skip"] and "out-of-memory" in res["big", "m"]["skip"]
    # By default one interleaved child times all variants: its failure is every variant's.
    res = benchlib.run_all(script, ["small", "big"], ["m"], "cpu", 1, [], memory=False)
    assert all("killed by SIGKILL" in res[v, "m"]["skip"] for v in ("small", "big"))
    # A child that succeeds is unmarked.
    assert benchlib.run_all(script, ["small"], ["m"], "cpu", 1, [], memory=False)["small", "m"] == {"time": 0.5}


def test_multiply_errors_rows_add_up_and_split_by_carries():
    """bench/multiply_errors.py: per model, accuracy and the first-wrong-step shares add up to 1, and accuracy by
    carries counts each problem once."""
    import multiply_errors
    from rlvr_fast.tasks.multiply import MultiplyTask, answer_line, carries, worked_product
    problems = MultiplyTask(digits=(2, 2), curriculum=False, eval_size=8).eval_problems()
    texts = []
    for i, p in enumerate(problems):
        a, b = p.meta["a"], p.meta["b"]
        worked = worked_product(a, b)
        texts.append(worked + "\n" + answer_line(a * b) if i % 2 == 0 else worked + "\n" + answer_line(a * b + 1))
    row = multiply_errors.error_row("m", texts, problems)
    assert row[0] == "m" and row[1] == "0.500" and row[6] == "0.500"  # the odd ones: every step right, answer wrong
    assert abs(sum(float(x) for x in row[1:9]) - 1) < 1e-9
    counted = [int(cell.split("(")[1].rstrip(")")) for cell in row[9:] if cell != "-"]
    assert sum(counted) == len(problems)
    low = [i for i, p in enumerate(problems) if carries(p.meta["a"], p.meta["b"]) <= 2]
    if low:
        assert row[9] == f"{sum(i % 2 == 0 for i in low) / len(low):.2f} ({len(low)})"
