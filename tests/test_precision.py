"""Mixed precision: bf16 weights stepped through fp32 master weights with stochastic rounding."""

from __future__ import annotations

import json

import pytest
import torch

import rlvr_fast
from rlvr_fast.grpo.precision import MasterWeights, cpu_has_fast_bf16, pick_dtype, stochastic_round_bf16
from rlvr_fast.train import main
from tests.test_train import args, tiny  # noqa: F401  (module fixture)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 1e-3, -0.0123456, 3.0e-5, 7.0]).repeat_interleave(40_000)
    r = stochastic_round_bf16(x, gen)
    assert r.dtype == torch.bfloat16
    for value in x.unique():
        got = r[x == value].float()
        lo = value.to(torch.bfloat16).float()  # one neighbour; the other is one bf16 ulp away
        assert got.unique().numel() <= 2
        assert ((got - value).abs() < 2 * (lo.abs() * 2 ** -7 + 1e-30)).all()
        # Mean equals the fp32 value within a few standard errors (ulp / sqrt(n)).
        assert abs(float(got.mean()) - float(value)) < 5 * float(lo.abs()) * 2 ** -8 / 200
    # Values already representable in bf16 never move; infinities stay.
    exact = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf")]).repeat(1000)
    assert torch.equal(stochastic_round_bf16(exact, gen).float(), exact)


def test_master_weights_keep_small_updates_that_bf16_would_lose():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    start = model.weight.detach().float().clone()
    master = MasterWeights(model, seed=1)
    assert master.enabled and master.master_params[0].dtype == torch.float32
    opt = torch.optim.SGD(master.master_params, lr=1.0)
    for step in range(200):  # 200 steps of +1e-5: far below a bf16 ulp of weights ~0.1
        model.weight.grad = torch.full_like(model.weight, -1e-5)
        master.grads_to_master()
        assert model.weight.grad is None and master.master_params[0].grad.dtype == torch.float32
        opt.step()
        master.master_to_model(step)
    moved = model.weight.detach().float() - start
    # The masters moved by 2e-3 exactly; the bf16 weights by the same on average (stochastic rounding).
    assert torch.allclose(master.master_params[0] - start, torch.full_like(start, 2e-3), atol=1e-5)
    assert abs(float(moved.mean()) - 2e-3) < 2e-4
    # The same 200 steps applied to bf16 weights directly round away on every weight above ~0.005.
    pure = model.weight.detach().clone().copy_(start)
    for _ in range(200):
        pure += 1e-5
    assert torch.equal(pure[start.abs() > 0.01].float(), start[start.abs() > 0.01])


def test_fp32_parameters_are_their_own_masters():
    model = torch.nn.Linear(8, 8)
    master = MasterWeights(model)
    assert not master.enabled and all(m is p for m, p in zip(master.master_params, model.parameters()))
    assert master.state_dict() is None


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                                      (False, True, torch.bfloat16)])
def test_auto_dtype_on_cpu_follows_the_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    """auto picks bf16 on a CPU exactly when torch reports AMX or AVX512-BF16. raising=True: if torch
    renames a probe, this fails instead of auto quietly picking fp32 on every CPU."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=True)
    assert cpu_has_fast_bf16() is (amx or avx512_bf16)
    assert pick_dtype("auto", torch.device("cpu")) == expected


def test_auto_dtype_on_cuda_and_explicit_names():
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        assert pick_dtype(name, torch.device("cuda")) == pick_dtype(name, torch.device("cpu")) == dtype


def test_bf16_run_trains_masters_and_saves_bf16(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "2", "--dtype", "bfloat16")) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["grad_norm"] > 0 and not record["skipped_update"]
    from safetensors import safe_open
    with safe_open(str(out / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, _ = rlvr_fast.load_pretrained(out / "checkpoint-2", dtype=torch.bfloat16)
    initial, _ = rlvr_fast.load_pretrained(tiny, dtype=torch.bfloat16)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    masters = state["master_weights"]
    assert masters is not None and all(m.dtype == torch.float32 for m in masters)
