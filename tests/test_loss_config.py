"""LossConfig (kernels/loss_options.py), the one definition of the GRPO loss's options: its checks reach the
kernels, the references and the command line (flags and config files) with the same words, and a config
object means exactly what the same keyword arguments mean."""

import dataclasses
import re

import pytest
import torch

from rlvr_fast.grpo.config import TrainConfig
from rlvr_fast.kernels import LossConfig, fused_linear_grpo_loss, grpo_loss
from rlvr_fast.kernels.loss_options import LossOptionError
from rlvr_fast.kernels.reference import fused_linear_grpo_loss_ref, grpo_loss_ref
from rlvr_fast.train import parse_config
from tests.test_kernels_grpo_loss import make_batch
from tests.test_kernels_linear import make_grpo

BAD = [  # option, value, the error's words after the option's name
    ("loss_type", "ppo", "must be one of \\('grpo', 'bnpo', 'dr_grpo', 'dapo'\\), got 'ppo'"),
    ("ratio_level", "seq", "must be one of \\('token', 'sequence'\\), got 'seq'"),
    ("clip_low", 1.0, "must be in \\[0, 1\\), got 1.0"),
    ("clip_high", -0.1, "must be >= 0, got -0.1"),
    ("beta", float("nan"), "must be >= 0, got nan"),
    ("delta", 1.1, "\\(dual clip\\) must be a float > 1 \\+ clip_high = 1.2, got 1.1"),
    ("tis_cap", 0.0, "must be a positive float \\(e.g. 2.0\\) or None, got 0.0"),
    ("entropy_coef", float("inf"), "must be finite, got inf"),
    ("entropy_coef", torch.tensor(0.1), "must be a Python float, got tensor"),
    ("max_completion_len", 0, "must be a positive int or None, got 0"),
]


@pytest.mark.parametrize("option,value,words", BAD, ids=[f"{o}={v}" for o, v, _ in BAD])
def test_bad_values_get_the_same_error_everywhere(option, value, words, tmp_path, capsys):
    with pytest.raises(LossOptionError, match=f"^{option} {words}") as info:
        LossConfig(**{option: value})
    assert info.value.option == option
    logp, old, ref, adv, mask = make_batch(3, 4)
    h, w, y, old2, ref2, adv2, mask2 = make_grpo(3, 4, 8, 11, torch.float32)
    calls = {"grpo_loss": lambda **kw: grpo_loss(logp, old, ref, adv, mask, **kw),
             "grpo_loss_ref": lambda **kw: grpo_loss_ref(logp, old, ref, adv, mask, **kw),
             "fused_linear_grpo_loss": lambda **kw: fused_linear_grpo_loss(h, w, y, old2, ref2, adv2, mask2, **kw)}
    for op, call in calls.items():
        with pytest.raises(ValueError, match=f"^{op}: {option} {words}"):
            call(**{option: value})
    if isinstance(value, torch.Tensor) or option == "max_completion_len":
        return  # not a flag (the trainer's dr_grpo length is --max-new-tokens)
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} {words}"):
        TrainConfig(**{option: value})
    config = tmp_path / "run.toml"  # argparse checks a flag's choices itself, never a config file's
    config.write_text(f"{option} = {value!r}\n")
    flag_argv = [[flag, str(value)]] if option not in ("loss_type", "ratio_level") else []
    for argv in flag_argv + [["--config", str(config)]]:
        with pytest.raises(SystemExit):
            parse_config(argv)
        assert re.search(f"error: {flag} {words}", capsys.readouterr().err)


def test_trainer_flags_are_the_config_fields():
    """The trainer's loss flags are LossConfig's fields, with its defaults, and reach it unchanged."""
    assert TrainConfig().loss() == LossConfig(max_completion_len=TrainConfig().max_new_tokens)
    cfg = parse_config(["--loss-type", "dapo", "--clip-low", "0.1", "--clip-high", "0.28", "--beta", "0",
                        "--ratio-level", "sequence", "--delta", "2", "--tis-cap", "3", "--entropy-coef", "0.01",
                        "--max-new-tokens", "17"])
    assert cfg.loss() == LossConfig(loss_type="dapo", clip_low=0.1, clip_high=0.28, beta=0.0, ratio_level="sequence",
                                    delta=2.0, tis_cap=3.0, entropy_coef=0.01, max_completion_len=17)
    loss_fields = {f.name: f for f in dataclasses.fields(LossConfig)}
    for f in dataclasses.fields(TrainConfig):
        if f.name in loss_fields:
            assert (f.default, f.metadata) == (loss_fields[f.name].default, loss_fields[f.name].metadata), f.name


def test_unknown_option_and_wrong_config_type():
    logp, old, ref, adv, mask = make_batch(3, 4)
    with pytest.raises(TypeError, match="grpo_loss: unknown option\\(s\\) clip_hi; the loss options are loss_type"):
        grpo_loss(logp, old, ref, adv, mask, clip_hi=0.3)
    with pytest.raises(TypeError, match="grpo_loss: config must be a LossConfig, got dict"):
        grpo_loss(logp, old, ref, adv, mask, config={"beta": 0.0})
    with pytest.raises(ValueError, match="grpo_loss: entropy_coef=0.1 needs the logits; use fused_linear_grpo_loss"):
        grpo_loss(logp, old, ref, adv, mask, entropy_coef=0.1)


CONFIG = dict(loss_type="dapo", clip_low=0.1, clip_high=0.3, beta=0.05, ratio_level="sequence", delta=1.6,
              tis_cap=2.0, max_completion_len=9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_config_equals_keywords(backend, ratio_level):
    """config=LossConfig(...) gives bit-identical losses, statistics and gradients to the same keyword arguments,
    and keyword arguments next to a config replace its values."""
    options = {**CONFIG, "ratio_level": ratio_level}
    logp, old, ref, adv, mask = make_batch(4, 5)
    roll = old + 0.3
    h, w, y, old2, ref2, adv2, mask2 = make_grpo(4, 5, 8, 11, torch.float32)

    def run_grpo(**kw):
        lp = logp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, old, ref, adv, mask, rollout_logprobs=roll, backend=backend, **kw)
        loss.backward()
        return loss, stats, lp.grad

    def run_fused(**kw):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, stats = fused_linear_grpo_loss(hh, ww, y, old2, ref2, adv2, mask2, rollout_logprobs=old2 + 0.2,
                                             backend=backend, **kw)
        loss.backward()
        return loss, stats, hh.grad, ww.grad

    for run, extra in ((run_grpo, {}), (run_fused, {"entropy_coef": 0.02})):
        as_keywords = run(**options, **extra)
        as_config = run(config=LossConfig(**options, **extra))
        overridden = run(config=LossConfig(**{**options, "beta": 0.7}, **extra), beta=options["beta"])
        for got in (as_config, overridden):
            assert torch.equal(got[0], as_keywords[0]) and set(got[1]) == set(as_keywords[1])
            assert all(torch.equal(got[1][k], as_keywords[1][k]) for k in got[1])
            assert all(torch.equal(a, b) for a, b in zip(got[2:], as_keywords[2:]))
    cfg = LossConfig(**options)
    loss_kw, stats_kw = grpo_loss_ref(logp.double(), old.double(), ref.double(), adv.double(), mask,
                                      rollout_logprobs=roll.double(), **options)
    loss_cfg, stats_cfg = grpo_loss_ref(logp.double(), old.double(), ref.double(), adv.double(), mask,
                                        rollout_logprobs=roll.double(), config=cfg)
    assert torch.equal(loss_kw, loss_cfg) and all(torch.equal(stats_kw[k], stats_cfg[k]) for k in stats_kw)
    loss_kw, _ = fused_linear_grpo_loss_ref(h, w, y, old2, ref2, adv2, mask2, entropy_coef=0.02, **options)
    loss_cfg, _ = fused_linear_grpo_loss_ref(h, w, y, old2, ref2, adv2, mask2,
                                             config=dataclasses.replace(cfg, entropy_coef=0.02))
    assert torch.equal(loss_kw, loss_cfg)
