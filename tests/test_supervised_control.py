"""--method sft and --max-train-minutes: the supervised control that a GRPO run is measured against. An sft step is
one more cold-start step (the demonstrations' NLL, no rollout), continues its problem stream on resume, and a
time budget stops either kind of run after the same summed step time; bench_learning --control builds the control
from a finished recipe run and tabulates the two from their files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import rlvr_fast
from rlvr_fast.train import main, parse_config
from tests.test_cold_start import DemoTask, records  # noqa: F401  (registers demo-test)
from tests.test_train import args, assert_resume_equals_straight_run
from tests.tiny import make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def test_sft_steps_learn_the_demonstrations_without_a_rollout(tiny, tmp_path, monkeypatch):
    from rlvr_fast.grpo import trainer as trainer_mod
    monkeypatch.setattr(trainer_mod.GRPOTrainer, "draw_groups",
                        lambda self: pytest.fail("an sft step must not sample"))
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "demo-test", "--method", "sft", "--lr", "1e-2", "--steps", "6",
                     "--eval-every", "3", "--cold-start-batch", "3", "--beta", "0.1")) == 0
    steps = records(out / "metrics.jsonl")
    assert [m["step"] for m in steps] == list(range(1, 7))
    assert all(m["method"] == "sft" and m["demonstrations"] == 6 and not m["skipped_update"] for m in steps)
    assert steps[-1]["nll"] < 0.6 * steps[0]["nll"]  # the same two answers every step: learnt
    assert "reward_mean" not in steps[0]
    evals = records(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3, 6]
    # the evaluations carry the summed step time so far: the time axis of bench_learning --control
    assert evals[0]["train_seconds"] == 0
    assert evals[1]["train_seconds"] == pytest.approx(sum(m["step_time_s"] for m in steps[:3]), abs=1e-3)
    assert evals[2]["train_seconds"] == pytest.approx(sum(m["step_time_s"] for m in steps), abs=1e-3)
    assert (out / "plot.png").stat().st_size > 0
    trained, _ = rlvr_fast.load_pretrained(out / "checkpoint-6")
    initial, _ = rlvr_fast.load_pretrained(tiny)
    w = lambda m: m.model.layers[0].mlp.up_proj.weight  # noqa: E731
    assert (w(trained) - w(initial)).abs().max() > 1e-3


def test_an_sft_step_is_the_nll_setting_of_the_fused_loss(tiny, tmp_path, monkeypatch):
    """Whatever GRPO options the run names, an sft step's loss is the cold start's: advantages 1, no KL reference,
    no old log-probs, a token mean."""
    from rlvr_fast.grpo import trainer as trainer_mod
    from rlvr_fast.kernels import LossConfig
    seen = []
    real = trainer_mod.fused_linear_grpo_loss

    def spy(*a, **kw):
        seen.append((kw["config"], a[3], a[4], a[5]))
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "fused_linear_grpo_loss", spy)
    assert main(args(tiny, tmp_path / "run", "--task", "demo-test", "--method", "sft", "--steps", "2",
                     "--beta", "0.1", "--loss-type", "dapo", "--entropy-coef", "0.01")) == 0
    assert seen and all(c == LossConfig(beta=0.0, loss_type="bnpo") and old is None and ref is None
                        and bool((adv == 1).all()) for c, old, ref, adv in seen)


def test_resumed_sft_run_equals_a_straight_one(tiny, tmp_path):
    common = ("--task", "demo-test", "--method", "sft", "--lr", "3e-3")
    straight, split = assert_resume_equals_straight_run(tiny, tmp_path, common, steps=3, split_at=1)
    nll = lambda run: [m["nll"] for m in records(run / "metrics.jsonl")]  # noqa: E731
    assert nll(straight) == nll(split)


@pytest.mark.parametrize("method", ["grpo", "sft"])
def test_a_time_budget_stops_the_steps_and_the_final_evaluation_follows(tiny, tmp_path, method):
    out = tmp_path / "run"
    # 6 ms: the first step alone spends it
    assert main(args(tiny, out, "--task", "demo-test", "--method", method, "--steps", "50", "--eval-every", "1",
                     "--max-train-minutes", "0.0001")) == 0
    assert [m["step"] for m in records(out / "metrics.jsonl")] == [1]
    assert [e["step"] for e in records(out / "eval.jsonl")] == [0, 1]  # no evaluation twice at step 1
    assert (out / "checkpoint-1").is_dir()


def test_sft_needs_a_task_with_demonstrations(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--method sft needs a task with demonstrations"):
        main(args(tiny, tmp_path / "run", "--task", "digits-test", "--method", "sft", "--steps", "1"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad,message", [(["--method", "ppo"], "argument --method: invalid choice"),
                                         (["--max-train-minutes", "-1"], "--max-train-minutes must be >= 0")])
def test_bad_control_options_fail_before_work(tiny, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        main(args(tiny, tmp_path / "run", "--task", "demo-test", "--steps", "1", *bad))
    assert message in capsys.readouterr().err


# ---- bench_learning --control ----------------------------------------------------------------------------------

def write_run(run: Path, evals: list[tuple[int, float, float, bool]], steps: list[dict], cold_steps: int = 0,
              **config) -> Path:
    from rlvr_fast.grpo.config import TrainConfig
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**TrainConfig(**config).to_dict(), "output": str(run)}))
    (run / "eval.jsonl").write_text("".join(
        json.dumps({"step": s, "train_seconds": t, "set": "target", "size": 8, "accuracy": a,
                    **({"after_cold_start": True} if c else {})}) + "\n" for s, t, a, c in evals))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in steps))
    (run / "cold_start.jsonl").write_text("".join(json.dumps({"cold_start_step": i + 1, "step_time_s": 5.0}) + "\n"
                                                  for i in range(cold_steps)))
    return run


def test_config_options_give_back_the_runs_config():
    import bench_learning
    from rlvr_fast.grpo.config import TrainConfig
    from rlvr_fast.train import parse_config
    cfg = TrainConfig(digits=(4, 2), curriculum=False, lr=1e-5, beta=0.0, reward=("number:1", "format:0.1"),
                      task="jsonl", data="x.jsonl", clip_high=0.28, cold_start_batch=8, output="somewhere")
    again = parse_config(bench_learning.config_options(cfg.to_dict()) + ["--output", "somewhere"])
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("own_cold_start", [True, False])
def test_control_options_match_the_grpo_time_from_the_runs_files(tmp_path, own_cold_start):
    """A recipe run (its own cold start) or a run from another run's cold-start model: the control starts from the
    model GRPO started from, at the cold start's lr and batch, for the GRPO steps' summed time."""
    import bench_learning
    cold = dict(cold_start_lr=1.5e-4, cold_start_batch=8, cold_start_steps=3)
    grpo_steps = [{"step": s, "step_time_s": 20.0, "accuracy": 0.5, "entropy": 0.1} for s in (1, 2, 3, 4)]
    grpo_evals = [(0, 0, 0.0, False), (0, 0, 0.25, True), (4, 80, 0.5, False)]
    common = dict(digits=(4, 2), curriculum=False, lr=1e-5, eval_every=2, seed=1)
    if own_cold_start:
        grpo = write_run(tmp_path / "grpo", grpo_evals, grpo_steps, cold_steps=3, **common, **cold)
        model = grpo / "cold-start"
    else:
        source = write_run(tmp_path / "cs", grpo_evals[:2], [], cold_steps=3, **cold)
        model = source / "cold-start"
        grpo = write_run(tmp_path / "grpo", [(0, 0, 0.25, False), (4, 80, 0.5, False)], grpo_steps, **common,
                         model=str(model))
        assert bench_learning.parent_run(grpo) == source
    cfg = parse_config(bench_learning.control_options(grpo))  # as the trainer reads them: the last one given wins
    assert cfg.method == "sft" and cfg.lr == 1.5e-4 and cfg.cold_start_steps == 0 and cfg.cold_start_batch == 8
    assert cfg.model == str(model) and cfg.seed == 1 and cfg.digits == (4, 2) and not cfg.curriculum
    assert cfg.max_train_minutes == pytest.approx(80 / 60, abs=1e-4)
    # GRPO evaluated every 2 steps of 20 s = every 40 s; sft steps took 5 s (the cold start's): every 8 steps
    assert cfg.eval_every == 8
    assert cfg.schedule == "constant" and cfg.steps >= 1_000_000  # the time limit ends it


def test_control_of_a_decayed_cold_start_decays_again_over_grpos_time(tmp_path):
    """--cold-start-schedule cosine: the control warms up and decays again, over the steps that fit GRPO's time
    at the cold start's step time (80 s / 5 s = 16), the time limit still set."""
    import bench_learning
    grpo = write_run(tmp_path / "grpo", [(0, 0, 0.0, False), (0, 0, 0.25, True), (4, 80, 0.5, False)],
                     [{"step": s, "step_time_s": 20.0, "accuracy": 0.5, "entropy": 0.1} for s in (1, 2, 3, 4)],
                     cold_steps=3, cold_start_lr=1.5e-4, cold_start_batch=8, cold_start_steps=3,
                     cold_start_schedule="cosine", lr=1e-5)
    cfg = parse_config(bench_learning.control_options(grpo))
    assert cfg.schedule == "cosine" and cfg.steps == 16 and cfg.lr == 1.5e-4
    assert cfg.warmup_steps == bench_learning.CONTROL_WARMUP
    assert cfg.max_train_minutes == pytest.approx(80 / 60, abs=1e-4)


def test_the_control_of_a_run_from_a_supervised_runs_checkpoint_continues_those_steps(tmp_path):
    """GRPO from the end of a --method sft run (itself from a cold start): its control continues the sft run's
    steps (their lr, batch and step time), and the table's first model is the cold start's own first model."""
    import bench_learning
    cs = write_run(tmp_path / "cs", [(0, 0, 0.0, False), (0, 0, 0.25, True)], [], cold_steps=3,
                   cold_start_lr=1.5e-4, cold_start_batch=8, cold_start_steps=3)
    sft = write_run(tmp_path / "sft", [(0, 0, 0.25, False), (4, 40, 0.375, False)],
                    [{"step": s, "step_time_s": 10.0, "method": "sft"} for s in (1, 2, 3, 4)],
                    model=str(cs / "cold-start"), method="sft", lr=2e-4, cold_start_batch=6)
    grpo = write_run(tmp_path / "grpo", [(0, 0, 0.375, False), (2, 40, 0.5, False)],
                     [{"step": s, "step_time_s": 20.0, "accuracy": 0.4, "entropy": 0.1} for s in (1, 2)],
                     model=str(sft / "checkpoint-4"), eval_every=1)
    cfg = parse_config(bench_learning.control_options(grpo))
    assert cfg.lr == 2e-4 and cfg.cold_start_batch == 6 and cfg.eval_every == 2
    assert cfg.model == str(sft / "checkpoint-4")
    assert bench_learning.first_model_accuracy(grpo) == 0.0
    with pytest.raises(SystemExit, match="no GRPO step"):
        bench_learning.control_options(sft)


def test_control_table_and_plot_read_both_arms(tmp_path, monkeypatch):
    import bench_learning
    pairs = []
    for seed, (grpo_end, sft_end) in enumerate([(0.5, 0.375), (0.625, 0.375), (0.75, 0.5)]):
        grpo = write_run(tmp_path / f"g{seed}", [(0, 0, 0.0, False), (0, 0, 0.25, True), (1, 20, 0.5, False),
                                                 (2, 40, grpo_end, False)],
                         [{"step": s, "step_time_s": 20.0, "accuracy": 0.4, "entropy": None if s == 1 else 0.2}
                          for s in (1, 2)], cold_steps=2)
        sft = write_run(tmp_path / f"s{seed}", [(0, 0, 0.25, False), (8, 40, sft_end, False)],
                        [{"step": s, "step_time_s": 5.0, "method": "sft"} for s in range(1, 9)],
                        lr=1.5e-4, cold_start_batch=8)
        pairs.append((f"seed {seed}", grpo, sft, 600.0))
    table = bench_learning.control_table("4x2", pairs)
    # GRPO - control over GRPO's evaluations: at 20 s the control is interpolated halfway from 0.25 to 0.375
    # (0.3125, so GRPO's 0.5 leads by 0.1875), at 40 s by 0.125: mean 0.156
    assert ("| seed 0 | 0.000 | 0.250 | 0.500 | 0.375 | +0.125 | +0.156 | +0.250 | 2, 0.7 min | 8, 0.7 min | 10.0 min |"
            in table)
    # means over seeds with their standard errors: GRPO 0.625 ± 0.072, control 0.417 ± 0.042, difference 0.208 ± 0.042
    assert "| mean ± s.e. (3 runs) | 0.000 ± 0.000 | 0.250 ± 0.000 | 0.625 ± 0.072 | 0.417 ± 0.042 | 0.208 ± 0.042 |" in table
    assert "GRPO - control, mean over GRPO's evaluations" in table
    assert "lr 0.00015, 8 problems per step" in table
    bench_learning.control_plot("4x2", pairs, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_control_of_reruns_only_unfinished_controls(tmp_path, monkeypatch):
    """--control-of keeps a control that finished (OUTPUT/latest written after its final checkpoint, kept when the
    checkpoint is deleted for disk space) and runs the one that has no `latest`."""
    import bench_learning
    runs = []
    for name in ("done", "todo"):
        runs.append(write_run(tmp_path / name, [(0, 0, 0.25, False), (1, 20, 0.5, False)],
                              [{"step": 1, "step_time_s": 20.0, "accuracy": 0.4, "entropy": 0.1}], cold_steps=2))
    (tmp_path / "done-control").mkdir()
    (tmp_path / "done-control" / "latest").write_text("checkpoint-4\n")
    ran, published = [], []
    monkeypatch.setattr(bench_learning, "train", lambda options, out: ran.append(out) or (0.0, 0.0, 0.0))
    monkeypatch.setattr(bench_learning, "publish_control", lambda name, pairs, *a, **k: published.extend(pairs))
    bench_learning.run_control_of("x", runs, "title")
    assert ran == [tmp_path / "todo-control"]
    assert [p[2] for p in published] == [tmp_path / "done-control", tmp_path / "todo-control"]


def test_a_stopped_control_bench_resumes_and_refuses_other_options(tmp_path, monkeypatch):
    """--control --keep DIR: a finished recipe run of the same options (OUTPUT/latest written) is tabulated, not run
    again, whatever its --save-every; its wall time comes from its bench.json; a finished run of other options is
    refused; an unfinished one is run again."""
    import bench_learning
    from rlvr_fast.train import parse_config
    options = bench_learning.RUNS["2x2"] + ["--seed", "0"]
    done = tmp_path / "done"
    done.mkdir()
    config = parse_config(["--task", "multiply", *options, "--save-every", "7", "--output", str(done)]).to_dict()
    (done / "config.json").write_text(json.dumps(config))
    assert not bench_learning.finished_run(done, options)  # no `latest`: stopped before its end
    (done / "latest").write_text("checkpoint-14\n")
    assert bench_learning.finished_run(done, options)
    (done / "bench.json").write_text(json.dumps({"seconds": 900.0}))
    ran = []
    monkeypatch.setattr(bench_learning, "train", lambda opts, out: ran.append(out) or (60.0, 0.0, 0.0))
    assert bench_learning.train_once(options, done) == 900.0 and ran == []
    assert bench_learning.train_once(options, tmp_path / "new") == 60.0 and ran == [tmp_path / "new"]
    assert json.loads((tmp_path / "new" / "bench.json").read_text()) == {"seconds": 60.0}
    with pytest.raises(SystemExit, match="other options.*seed"):
        bench_learning.finished_run(done, bench_learning.RUNS["2x2"] + ["--seed", "1"])
