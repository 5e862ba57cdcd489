"""End to end on a tiny random Llama: the command line, metrics, checkpoints, resume, faults."""

from __future__ import annotations

import dataclasses
import json
import random
import zlib

import pytest
import torch

import rlvr_fast
from rlvr_fast.tasks import Problem, register_task
from rlvr_fast.train import main
from tests.tiny import make_tiny_checkpoint

METRIC_FIELDS = {
    "step", "reward_mean", "reward_std", "reward_digits", "reward_hash", "accuracy", "format_rate", "reward_errors", "zero_std_groups",
    "completion_len_mean", "completion_len_max", "truncated_frac", "kl", "loss", "ratio_mean", "clip_low_frac",
    "clip_high_frac", "entropy", "grad_norm", "lr", "rollout_tokens_per_s", "train_tokens_per_s",
    "time_rollout_s", "time_reference_s", "time_update_s", "step_time_s", "peak_memory_gb",
}


class DigitsTask:
    """A reward that differs between any two different completions (a hash of the text), so every group of a
    random model trains; plus a `digits` component as a readable one."""

    name = "digits"
    reward_weights = {"hash": 1.0, "digits": 0.1, "correct": 0.0}

    def __init__(self, raise_every: int = 0):
        self.raise_every, self.calls = raise_every, 0

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [Problem([{"role": "user", "content": f"{rng.randint(1, 99)} * {rng.randint(1, 9)}"}], "0") for _ in range(n)]

    def eval_problems(self) -> list[Problem]:
        return self.sample(random.Random(7), 3)

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        self.calls += 1
        if self.raise_every and self.calls % self.raise_every == 0:
            raise RuntimeError("reward bug")
        return {"hash": zlib.crc32(completion.encode()) % 1000 / 1000,
                "digits": sum(ch.isdigit() for ch in completion) / max(1, len(completion)), "correct": 0.0}


register_task("digits-test", lambda cfg: DigitsTask())
register_task("digits-flaky", lambda cfg: DigitsTask(raise_every=3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def args(model, output, *extra):
    return ["--model", str(model), "--output", str(output), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--eval-size", "3", "--eval-every", "0", "--save-every", "0", "--sample-every", "1",
            "--micro-batch-tokens", "48", "--lr", "1e-3", "--warmup-steps", "0", "--dtype", "float32", *extra]


def test_two_steps_write_metrics_and_a_loadable_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "2")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert METRIC_FIELDS <= r.keys(), METRIC_FIELDS - r.keys()
        assert r["zero_std_groups"] == 0 and r["grad_norm"] > 0 and r["time_update_s"] > 0
    assert (out / "samples.jsonl").read_text().strip()
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    model, _ = rlvr_fast.load_pretrained(out / "checkpoint-2")
    initial, _ = rlvr_fast.load_pretrained(tiny)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)


def assert_resume_equals_straight_run(model, tmp_path, options, steps: int, split_at: int):
    """A run of `steps` steps, and one stopped after `split_at` and resumed to `steps`, end with equal weights.
    Returns both run directories (straight, split) for further checks."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(model, straight, *options, "--steps", str(steps))) == 0
    assert main(args(model, split, *options, "--steps", str(split_at))) == 0
    assert main(["--resume", str(split), "--steps", str(steps)]) == 0
    a, _ = rlvr_fast.load_pretrained(straight / f"checkpoint-{steps}")
    b, _ = rlvr_fast.load_pretrained(split / f"checkpoint-{steps}")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    return straight, split


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_equals_straight_run(tiny, tmp_path, dtype):
    common = ("--task", "digits-test", "--beta", "0.05", "--num-iterations", "2", "--dtype", dtype)
    straight, split = assert_resume_equals_straight_run(tiny, tmp_path, common, steps=4, split_at=2)
    drop = ("time", "tokens_per_s", "peak_memory", "step_time")
    clean = lambda path: [{k: v for k, v in json.loads(line).items() if not any(d in k for d in drop)}
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert clean(straight) == clean(split)


def test_reward_errors_are_counted_not_fatal(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "digits-flaky", "--steps", "1")) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["reward_errors"] > 0
    assert main(args(tiny, tmp_path / "strict", "--task", "digits-flaky", "--steps", "1", "--strict-rewards")) == 1
    assert "--strict-rewards" in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [
    (["--task", "nope"], "unknown task"),
    (["--group-size", "1"], "group-size"),
    (["--temperature", "0"], "temperature"),
    (["--loss-type", "ppo"], "invalid choice"),
])
def test_bad_options_fail_before_work(tiny, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as exc:
        main(args(tiny, tmp_path / "run", "--steps", "1", *bad))
    assert message in str(exc.value.code) + capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_output_dir_of_another_run_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="--resume"):
        main(args(tiny, out, "--task", "digits-test", "--steps", "1"))


def test_model_that_does_not_load(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(args(tmp_path / "missing", tmp_path / "run", "--steps", "1"))


def test_config_file_and_flag_override(tiny, tmp_path):
    from rlvr_fast.train import parse_config
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('group-size = 6\nlr = 0.5\nloss_type = "bnpo"\n')
    cfg = parse_config(["--config", str(cfg_file), "--lr", "0.25"])
    assert (cfg.group_size, cfg.lr, cfg.loss_type) == (6, 0.25, "bnpo")
    cfg_file.write_text("bogus = 1\n")
    with pytest.raises(SystemExit, match="unknown option"):
        parse_config(["--config", str(cfg_file)])


class NaNTask(DigitsTask):
    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return {"hash": float("nan"), "correct": 0.0}


register_task("nan-test", lambda cfg: NaNTask())


def test_nan_updates_are_skipped_then_the_run_stops(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "nan-test", "--steps", "5", "--max-bad-steps", "2")) == 1
    assert "consecutive updates had NaN/Inf" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in records] == [True, True]
    assert not list(out.glob("checkpoint-*"))  # nothing was saved from the poisoned run


def test_ctrl_c_saves_and_resume_continues(tiny, tmp_path, monkeypatch):
    from rlvr_fast.grpo import trainer as trainer_mod
    real_step = trainer_mod.GRPOTrainer.train_step

    def interrupt_at_two(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return real_step(self)

    out = tmp_path / "run"
    monkeypatch.setattr(trainer_mod.GRPOTrainer, "train_step", interrupt_at_two)
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "3")) == 130
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    monkeypatch.setattr(trainer_mod.GRPOTrainer, "train_step", real_step)
    assert main(["--resume", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("loss_type,variant", [
    ("grpo", ()), ("bnpo", ()), ("dr_grpo", ()), ("dapo", ()),
    ("grpo", ("--ratio-level", "sequence", "--num-iterations", "2")),
    ("dapo", ("--tis-cap", "1.5", "--entropy-coef", "0.01", "--delta", "1.5")),
])
def test_micro_batching_equals_one_batch(tiny, tmp_path, monkeypatch, loss_type, variant):
    """Gradient accumulation is weighted per loss type so that token budgets do not change the gradient
    (dapo: every micro-batch divides by the step's token count)."""
    grads = []

    def record_instead_of_step(self, closure=None):
        grads.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])

    monkeypatch.setattr(torch.optim.AdamW, "step", record_instead_of_step)
    # One big micro-batch of plain sequences vs shared-prompt segments in one batch and in many small ones.
    for name, budget, share in (("one", "4096", "--no-share-prompts"), ("shared", "4096", "--share-prompts"),
                                ("many", "40", "--share-prompts")):
        assert main(args(tiny, tmp_path / name, "--task", "digits-test", "--steps", "1", "--loss-type", loss_type,
                         "--micro-batch-tokens", budget, share, "--beta", "0.1", "--max-grad-norm", "0", *variant)) == 0
    iters = 2 if "--num-iterations" in variant else 1
    one, shared, many = grads[:iters][-1], grads[iters:2 * iters][-1], grads[2 * iters:][-1]
    assert len(grads) == 3 * iters and len(one) == len(shared) == len(many) > 0
    for a, b, c in zip(one, shared, many):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-4)
    assert any(a.abs().sum() > 0 for a in one)


def test_options_reach_the_loss(tiny, tmp_path, monkeypatch):
    from rlvr_fast.grpo import trainer as trainer_mod
    seen = []
    real = trainer_mod.fused_linear_grpo_loss

    def spy(*a, **kw):
        seen.append({**dataclasses.asdict(kw["config"]), **kw, "mask": a[6]})  # the options arrive as one LossConfig
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "fused_linear_grpo_loss", spy)
    main(args(tiny, tmp_path / "run", "--task", "digits-test", "--steps", "1", "--loss-type", "dr_grpo", "--beta", "0.3",
              "--clip-low", "0.1", "--clip-high", "0.28", "--temperature", "0.7"))
    assert seen and all(kw["loss_type"] == "dr_grpo" and kw["beta"] == 0.3 and kw["clip_low"] == 0.1 and
                        kw["clip_high"] == 0.28 and kw["temperature"] == 0.7 and kw["max_completion_len"] == 6 for kw in seen)
    assert all(kw["num_tokens"] is None and kw["rollout_logprobs"] is None and kw["delta"] is None and
               kw["ratio_level"] == "token" and kw["entropy_coef"] == 0.0 for kw in seen)
    seen.clear()
    main(args(tiny, tmp_path / "variants", "--task", "digits-test", "--steps", "1", "--loss-type", "dapo",
              "--ratio-level", "sequence", "--delta", "2.5", "--tis-cap", "3", "--entropy-coef", "0.02"))
    record = json.loads((tmp_path / "variants" / "metrics.jsonl").read_text())
    total = sum(int(kw["mask"].sum()) for kw in seen)
    assert seen and all(kw["loss_type"] == "dapo" and kw["num_tokens"] == total and kw["ratio_level"] == "sequence"
                        and kw["delta"] == 2.5 and kw["tis_cap"] == 3 and kw["entropy_coef"] == 0.02 and
                        kw["rollout_logprobs"] is not None for kw in seen)
    # fp32 on both sides: the sampler's log-probs are the trainer's up to rounding, so TIS weights are ~1.
    assert 0 <= record["rollout_logprob_gap"] < 1e-4
    assert abs(record["tis_weight_mean"] - 1) < 1e-4 and record["tis_capped_frac"] == 0
    assert record["entropy_train"] > 0


def test_loss_variant_options_are_checked(tiny, tmp_path, capsys):
    for bad, message in ((["--delta", "1.1"], "--delta"), (["--tis-cap", "0"], "--tis-cap"),
                         (["--entropy-coef", "-1"], "--entropy-coef"), (["--ratio-level", "word"], "invalid choice")):
        with pytest.raises(SystemExit):
            main(args(tiny, tmp_path / "run", "--steps", "1", *bad))
        assert message in capsys.readouterr().err


def test_grad_checkpoint_flag_recomputes_layers(tiny, tmp_path, monkeypatch):
    from rlvr_fast.model import llama
    calls = []
    real = llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert main(args(tiny, tmp_path / "plain", "--task", "digits-test", "--steps", "1")) == 0
    assert not calls
    assert main(args(tiny, tmp_path / "ckpt", "--task", "digits-test", "--steps", "1", "--grad-checkpoint")) == 0
    assert calls  # one call per decoder layer and micro-batch, in the update only


class ScheduledTask(DigitsTask):
    """Groups whose completions all score alike on a schedule: "right" (all correct), "wrong" (all 0), "mixed"
    (the text's hash, so they differ), one list of kinds per draw of P = 2 prompts."""

    name = "scheduled"
    SCHEDULE = [["right", "wrong"], ["mixed", "wrong"], ["mixed", "mixed"],  # step 1: 3 rounds, 2 kept of 3 with signal
                ["wrong", "wrong"], ["right", "right"], ["wrong", "right"]]  # step 2: nothing to train

    def __init__(self):
        super().__init__()
        self.draws = 0

    def eval_problems(self) -> list[Problem]:
        return [Problem([{"role": "user", "content": "mixed 1"}], "0", meta={"kind": "mixed"})]

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        kinds = self.SCHEDULE[self.draws % len(self.SCHEDULE)]
        self.draws += 1
        return [Problem([{"role": "user", "content": f"{k} {rng.randint(1, 99)}"}], "0", meta={"kind": k})
                for k in kinds[:n]]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        kind = problem.meta.get("kind", "mixed")
        if kind == "mixed":
            return super().score(problem, completion)
        return {"hash": 0.0, "digits": 0.0, "correct": float(kind == "right")}


register_task("scheduled-test", lambda cfg: ScheduledTask())


def test_without_a_kl_reference_kl_is_not_reported_as_zero(tiny, tmp_path, capsys):
    """--beta 0 keeps no reference model: a step that trains reports KL as missing, not as 0."""
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "scheduled-test", "--steps", "1", "--beta", "0")) == 0
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step["grad_norm"] is not None and step["kl"] is None  # it trained, and measured no KL
    assert "kl -" in capsys.readouterr().out


def test_dynamic_sampling_draws_until_p_groups_have_signal(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "scheduled-test", "--steps", "2", "--max-oversample", "3")) == 0
    first, second = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (first["groups_drawn"], first["groups_kept"], first["skipped_all_right"], first["skipped_all_wrong"]) == \
        (6, 2, 1, 2)
    assert first["signal_frac"] == pytest.approx(3 / 6) and first["kl"] is not None and first["entropy"] > 0
    # Nothing with signal in 3 rounds: no update, and no update statistics.
    assert (second["groups_drawn"], second["groups_kept"], second["skipped_all_right"], second["skipped_all_wrong"]) \
        == (6, 0, 3, 3)
    assert second["kl"] is None and second["entropy"] is None and second["grad_norm"] is None
    assert "groups 2/6" in capsys.readouterr().out  # the progress line
    # One round: plain GRPO, the step trains the one group with signal it drew.
    assert main(args(tiny, tmp_path / "one", "--task", "scheduled-test", "--steps", "1", "--max-oversample", "1")) == 0
    (plain,) = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert (plain["groups_drawn"], plain["groups_kept"]) == (2, 0)


def test_entropy_is_that_of_the_loss_pass(tiny, tmp_path):
    """The logged entropy (the fused loss pass's, return_entropy) is the same with and without a (negligible)
    entropy bonus, at the same weights on the same completions (step 1 of two runs with one seed)."""
    for name, coef in (("plain", "0"), ("bonus", "1e-9")):
        assert main(args(tiny, tmp_path / name, "--task", "digits-test", "--steps", "1", "--entropy-coef", coef)) == 0
    plain, bonus = (json.loads((tmp_path / name / "metrics.jsonl").read_text()) for name in ("plain", "bonus"))
    assert plain["entropy"] > 0.5 and plain["entropy"] == plain["entropy_train"]
    assert plain["entropy"] == pytest.approx(bonus["entropy_train"], rel=1e-5) == bonus["entropy"]


def test_report_to_tensorboard_and_a_readable_plot(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "2", "--report-to", "tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reward_mean", "train/entropy", "train/kl", "train/signal_frac", "eval/target/accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/reward_mean")] == [1, 2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/reward_mean")] == pytest.approx([r["reward_mean"] for r in records])
    from matplotlib.image import imread
    image = imread(out / "plot.png")
    assert image.shape[0] > 400 and image.shape[1] > 400 and image.std() > 0.05  # drawn, not blank


def test_report_to_a_missing_package_fails_before_work(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit):
        main(args(tiny, tmp_path / "run", "--steps", "1", "--report-to", "wandb"))
    assert "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(args(tiny, tmp_path / "run", "--steps", "1", "--report-to", "mlflow"))
    assert "--report-to takes tensorboard or wandb" in capsys.readouterr().err
