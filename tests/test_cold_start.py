"""The cold start (--cold-start-steps): supervised steps on a task's demonstrations before GRPO. Its loss is
the demonstrations' negative log-likelihood, the KL reference becomes the model it leaves, a resumed run
reads that reference back and does not repeat it, and bad combinations are refused."""

from __future__ import annotations

import json
import random

import pytest
import torch

import rlvr_fast
from rlvr_fast.grpo.trainer import nll_loss, scheduled_lr
from rlvr_fast.kernels import LossConfig
from rlvr_fast.kernels.reference import linear_token_logprobs_ref
from rlvr_fast.tasks import Problem, register_task
from rlvr_fast.train import main
from tests.test_train import DigitsTask, args, assert_resume_equals_straight_run
from tests.tiny import make_tiny_checkpoint


class DemoTask(DigitsTask):
    """DigitsTask with demonstrations: two fixed answers per problem."""

    name = "demo-test"

    def demonstrations(self, rng: random.Random, n: int) -> list[tuple[Problem, list[str]]]:
        return [(p, ["Final Answer: 12", "Final Answer: 99"]) for p in self.sample(rng, n)]


register_task("demo-test", lambda cfg: DemoTask())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nll_loss_is_the_mean_nll(backend, monkeypatch):
    """nll_loss (the cold start's loss) has the gradient of the masked tokens' mean NLL under the temperature,
    and returns their summed NLL, with either kernel backend."""
    from rlvr_fast.grpo import trainer as trainer_mod
    real = trainer_mod.fused_linear_grpo_loss
    monkeypatch.setattr(trainer_mod, "fused_linear_grpo_loss", lambda *a, **kw: real(*a, **kw, backend=backend))
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 5, 16, 37
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 4
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:], mask[2, 1:] = 0, 0
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, nll_sum = nll_loss(hk, wk, y, mask, temperature=0.8)
    loss.backward()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    lp = linear_token_logprobs_ref(hr.view(-1, H), wr, y.view(-1), temperature=0.8).view(B, T)
    nll = -(lp * mask).sum() / mask.sum()
    nll.backward()
    torch.testing.assert_close(hk.grad, hr.grad.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(wk.grad, wr.grad.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nll_sum / mask.sum(), nll.detach().float(), atol=1e-5, rtol=1e-5)


def test_cold_start_learns_the_demonstrations_and_becomes_the_reference(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "demo-test", "--cold-start-steps", "6", "--cold-start-lr", "1e-2",
                     "--beta", "0.05", "--steps", "1")) == 0
    log = records(out / "cold_start.jsonl")
    assert [r["cold_start_step"] for r in log] == list(range(1, 7))
    assert all(r["demonstrations"] == 4 and r["lr"] == 1e-2 and not r["skipped_update"] for r in log)
    assert log[-1]["nll"] < 0.6 * log[0]["nll"]  # the same two answers every step: learnt
    evals = records(out / "eval.jsonl")
    assert [(e["step"], e.get("after_cold_start", False)) for e in evals] == [(0, False), (0, True), (1, False)]
    # The KL reference is the model after the cold start: at step 1 the policy still equals it.
    step = records(out / "metrics.jsonl")[0]
    assert step["kl"] is not None and 0 <= step["kl"] < 1e-6
    cold, _ = rlvr_fast.load_pretrained(out / "cold-start")
    initial, _ = rlvr_fast.load_pretrained(tiny)
    w = lambda m: m.model.layers[0].mlp.up_proj.weight
    assert (w(cold) - w(initial)).abs().max() > 1e-3


def test_scheduled_lr():
    """Warm-up rises linearly to the peak; constant holds it; linear and cosine fall from it towards 0 at the
    last step, cosine staying above linear in the first half and below in the second."""
    assert [scheduled_lr(1.0, "constant", s, 10, warmup=3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    for kind in ("linear", "cosine"):
        lrs = [scheduled_lr(2.0, kind, s, 10) for s in range(10)]
        assert lrs[0] == 2.0 and all(a > b for a, b in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 0.4
        assert scheduled_lr(2.0, kind, 10, 10) == pytest.approx(0.0, abs=1e-12)  # past the end: 0, not negative
    assert scheduled_lr(1.0, "cosine", 2, 10) > scheduled_lr(1.0, "linear", 2, 10)
    assert scheduled_lr(1.0, "cosine", 8, 10) < scheduled_lr(1.0, "linear", 8, 10)
    assert scheduled_lr(1.0, "cosine", 5, 10) == pytest.approx(0.5)


def test_cold_start_schedule_decays_its_lr(tiny, tmp_path):
    """--cold-start-schedule cosine: the cold start's own steps go from --cold-start-lr towards 0 (logged per
    step); GRPO's steps after it keep --lr and their own schedule."""
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "demo-test", "--cold-start-steps", "4", "--cold-start-lr", "1e-2",
                     "--cold-start-schedule", "cosine", "--beta", "0", "--steps", "1", "--warmup-steps", "0",
                     "--lr", "1e-3")) == 0
    lrs = [r["lr"] for r in records(out / "cold_start.jsonl")]
    assert lrs == pytest.approx([scheduled_lr(1e-2, "cosine", s, 4) for s in range(4)])
    assert lrs[0] == 1e-2 and lrs[-1] < 0.2e-2
    assert records(out / "metrics.jsonl")[0]["lr"] == 1e-3


def test_resume_after_a_cold_start_equals_a_straight_run(tiny, tmp_path):
    """The resumed run skips the cold start and takes its KL reference from OUTPUT/cold-start: were it the
    initial model, the KL term and so the weights would differ."""
    common = ("--task", "demo-test", "--cold-start-steps", "2", "--cold-start-lr", "3e-3", "--beta", "0.5")
    straight, split = assert_resume_equals_straight_run(tiny, tmp_path, common, steps=3, split_at=1)
    assert len(records(split / "cold_start.jsonl")) == 2
    drop = ("time", "tokens_per_s", "peak_memory")
    clean = lambda path: [{k: v for k, v in r.items() if not any(d in k for d in drop)}
                          for r in records(path / "metrics.jsonl")]
    assert clean(straight) == clean(split) and records(split / "metrics.jsonl")[-1]["kl"] > 0


def test_a_task_without_demonstrations_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit, match="demonstrations"):
        main(args(tiny, tmp_path / "run", "--task", "digits-test", "--cold-start-steps", "2", "--steps", "1"))
    assert not (tmp_path / "run").exists()  # before any work


def test_a_tokenizer_without_eos_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    """The demonstrations end with EOS; without one the run stops at once with what to do."""
    real = rlvr_fast.load_pretrained

    def no_eos(*a, **kw):
        model, tok = real(*a, **kw)
        tok.eos_token_id = None
        return model, tok

    monkeypatch.setattr(rlvr_fast, "load_pretrained", no_eos)
    with pytest.raises(SystemExit, match="no EOS token .* eos_token, or drop --cold-start-steps"):
        main(args(tiny, tmp_path / "run", "--task", "demo-test", "--cold-start-steps", "2", "--steps", "1"))
    assert not (tmp_path / "run").exists()


def test_cold_start_with_lora_and_a_kl_reference_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(args(tiny, tmp_path / "run", "--task", "demo-test", "--cold-start-steps", "2", "--lora-rank", "4",
                  "--steps", "1"))
    assert "--cold-start-steps with --lora-rank" in capsys.readouterr().err
    # With --beta 0 there is no reference to disagree with: LoRA adapters take the cold start.
    assert main(args(tiny, tmp_path / "ok", "--task", "demo-test", "--cold-start-steps", "2", "--lora-rank", "4",
                     "--beta", "0", "--steps", "1")) == 0
    assert len(records(tmp_path / "ok" / "cold_start.jsonl")) == 2


def test_cold_start_loss_ignores_the_grpo_variant_options(tiny, tmp_path, monkeypatch):
    """Whatever GRPO variant the run uses, the cold start's calls are the plain NLL setting."""
    from rlvr_fast.grpo import trainer as trainer_mod
    seen = []
    real = trainer_mod.fused_linear_grpo_loss

    def spy(*a, **kw):
        seen.append({**kw, "old": a[3], "ref": a[4], "adv": a[5]})
        return real(*a, **kw)

    monkeypatch.setattr(trainer_mod, "fused_linear_grpo_loss", spy)
    assert main(args(tiny, tmp_path / "run", "--task", "demo-test", "--cold-start-steps", "2", "--steps", "1",
                     "--loss-type", "dapo", "--ratio-level", "sequence", "--tis-cap", "2", "--entropy-coef", "0.01",
                     "--delta", "3", "--beta", "0.1", "--num-iterations", "2")) == 0
    n_cold = len(seen) - sum(1 for kw in seen if kw["config"].loss_type == "dapo")
    cold, grpo = seen[:n_cold], seen[n_cold:]
    assert cold and grpo
    for kw in cold:  # the NLL setting and nothing of the GRPO variant
        assert {k: v for k, v in kw.items() if k not in ("old", "ref", "adv")} == \
            {"config": LossConfig(beta=0.0, loss_type="bnpo"), "temperature": 0.8, "return_logprobs": True}
        assert kw["old"] is None and kw["ref"] is None and bool((kw["adv"] == 1).all())
    assert all(kw["config"].beta == 0.1 and kw["config"].ratio_level == "sequence" and kw["config"].tis_cap == 2
               for kw in grpo)


def test_steps_0_runs_only_the_cold_start_and_keeps_its_model(tiny, tmp_path):
    """--steps 0: the cold start, its evaluation (not repeated as the final one), and its model saved even without
    a KL reference, so GRPO runs can start from it (--model OUTPUT/cold-start)."""
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "demo-test", "--cold-start-steps", "2", "--beta", "0", "--steps", "0")) == 0
    assert len(records(out / "cold_start.jsonl")) == 2
    evals = records(out / "eval.jsonl")
    assert [(e["step"], e.get("after_cold_start", False)) for e in evals] == [(0, False), (0, True)]
    assert not (out / "metrics.jsonl").exists() or not records(out / "metrics.jsonl")
    cold, _ = rlvr_fast.load_pretrained(out / "cold-start")
    initial, _ = rlvr_fast.load_pretrained(tiny)
    w = lambda m: m.model.layers[0].mlp.up_proj.weight
    assert (w(cold) - w(initial)).abs().max() > 1e-4
    # A GRPO run from it starts where the cold start ended: the same greedy completions, the same rewards.
    assert main(args(out / "cold-start", tmp_path / "grpo", "--task", "demo-test", "--steps", "1")) == 0
    assert records(tmp_path / "grpo" / "eval.jsonl")[0]["reward_mean"] == evals[1]["reward_mean"]


def test_cold_start_batch_is_apart_from_the_grpo_batch(tiny, tmp_path):
    """--cold-start-batch sets the problems demonstrated per cold-start step; GRPO keeps --prompts-per-step."""
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "demo-test", "--cold-start-steps", "2", "--cold-start-batch", "3",
                     "--steps", "1", "--max-oversample", "1")) == 0
    assert [r["demonstrations"] for r in records(out / "cold_start.jsonl")] == [6, 6]  # 3 problems x 2 answers
    assert records(out / "metrics.jsonl")[0]["groups_drawn"] == 2


@pytest.mark.parametrize("bad,message", [(["--cold-start-steps", "-1"], "--cold-start-steps must be >= 0"),
                                         (["--cold-start-batch", "0"], "--cold-start-batch must be >= 1"),
                                         (["--cold-start-lr", "0"], "--cold-start-lr must be a positive number")])
def test_bad_cold_start_options_fail_before_work(tiny, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        main(args(tiny, tmp_path / "run", "--task", "demo-test", "--steps", "1", *bad))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
