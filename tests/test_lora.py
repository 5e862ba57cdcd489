"""LoRA (model/lora.py, checkpoint/adapters.py): exact start, gradients only in adapters, adapters-off
equals the base model, the rollout's packed path, PEFT and transformers loading, training and resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import rlvr_fast
from rlvr_fast import LlamaConfig, LlamaForCausalLM
from rlvr_fast.checkpoint.adapters import ADAPTER_CONFIG, ADAPTER_FILE, load_adapters, save_adapters
from rlvr_fast.model.lora import ALL_TARGETS, LoRAConfig, LoRALinear, apply_lora, lora_disabled, lora_modules
from rlvr_fast.model.packed import PackedLinear
from rlvr_fast.rollout import RolloutEngine, SamplingParams
from rlvr_fast.train import main
from tests.test_train import args  # noqa: F401  (also registers the digits-test task)
from tests.tiny import TINY_CONFIG, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def tiny_model(dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig.from_dict({**TINY_CONFIG, **overrides, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.to(dtype).eval()


def randomize_adapters(model: LlamaForCausalLM, std: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * std)


def batch(model: LlamaForCausalLM, lengths=(7, 12, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (sum(lengths),), generator=gen)
    return ids, torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapters_leave_logits_identical(dtype):
    model = tiny_model(dtype)
    ids, cu = batch(model)
    before = model(ids, cu)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == len(ALL_TARGETS) * model.config.num_hidden_layers
    assert torch.equal(model(ids, cu), before)  # B = 0: exactly the base model
    a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert a.dtype == torch.float32 and a.abs().sum() > 0  # A random, fp32 even on a bf16 base


def test_gradients_reach_only_the_adapters():
    model = tiny_model(tie_word_embeddings=False)
    base = {name: p for name, p in model.named_parameters()}
    adapters = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "down")))
    randomize_adapters(model)  # with B = 0 the gradient of A is exactly 0; make both non-trivial
    assert len(adapters) == 2 * 3 * model.config.num_hidden_layers
    assert all(not p.requires_grad for p in base.values())
    ids, cu = batch(model)
    model(ids, cu).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # The weights are the original Parameter objects (no copy of the base).
    assert model.model.layers[0].self_attn.q_proj.weight is base["model.layers.0.self_attn.q_proj.weight"]


def test_adapters_off_equals_base_model():
    base = tiny_model()
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=16))
    randomize_adapters(model)
    ids, cu = batch(model)
    with torch.no_grad():
        adapted = model(ids, cu)
        with lora_disabled(model):
            off = model(ids, cu)
        again = model(ids, cu)
    assert torch.equal(off, base(ids, cu))
    assert not torch.allclose(adapted, off, atol=1e-3)
    assert torch.equal(again, adapted)  # switched back on after the block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_forward_equals_merged_weights(dtype):
    model = tiny_model(dtype)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    merged = tiny_model(dtype)
    merged.load_state_dict({k: v for k, v in rlvr_fast.model.lora.merged_state_dict(model).items()})
    ids, cu = batch(model)
    with torch.no_grad():
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
        torch.testing.assert_close(model(ids, cu).float(), merged(ids, cu).float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", [True, False])
def test_packed_rollout_projections_add_the_adapters(dtype, merge):
    """fp32: merged into the packed copy (or, merge off, added per call like bf16); the copy follows the
    adapters' state when it is built."""
    model = tiny_model(dtype)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    attn = model.model.layers[1].self_attn
    x = torch.randn(5, model.config.hidden_size).to(dtype)
    targets = (attn.q_proj, attn.k_proj, attn.v_proj)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        packed = PackedLinear(list(targets), merge_fp32_adapters=merge)
        assert all(a is None for a in packed.adapters) == (merge and dtype == torch.float32)
        for got, m in zip(packed(x), targets):
            torch.testing.assert_close(got, m(x), **tol)
            assert not torch.allclose(got, torch.nn.functional.linear(x, m.weight), **tol)
        with lora_disabled(model):
            packed = PackedLinear(list(targets), merge_fp32_adapters=merge)
            for got, m in zip(packed(x), targets):
                torch.testing.assert_close(got, torch.nn.functional.linear(x, m.weight), **tol)


def test_rollout_engine_samples_from_the_adapted_model(tiny, tmp_path):
    """Greedy rollout of the LoRA model (packed base + unmerged adapters) = rollout of the merged checkpoint."""
    model, tok = rlvr_fast.load_pretrained(tiny)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model, std=0.2)
    rlvr_fast.save_pretrained(model, tok, tmp_path / "merged")
    merged, _ = rlvr_fast.load_pretrained(tmp_path / "merged")
    base, _ = rlvr_fast.load_pretrained(tiny)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    prompts = ["12 * 3 =", "The quick brown"]
    run = lambda m: RolloutEngine(m, tok, num_blocks=16).generate(prompts, params)  # noqa: E731
    ours, ref, plain = run(model), run(merged), run(base)
    for a, b in zip(ours, ref):
        assert a[0].token_ids == b[0].token_ids
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-4)
    assert [g[0].token_ids for g in ours] != [g[0].token_ids for g in plain]  # the adapters do change the samples


def test_adapter_files_use_peft_layout(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "o", "up")))
    save_adapters(model, tmp_path / "adapter", base_model="some/base")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "some/base")
    assert config["target_modules"] == ["q_proj", "o_proj", "up_proj"]
    cfg = model.config
    with safe_open(tmp_path / "adapter" / ADAPTER_FILE, "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert len(shapes) == 2 * 3 * cfg.num_hidden_layers
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, cfg.hidden_size)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (cfg.num_attention_heads * cfg.head_dim, 4)
    assert shapes["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] == (cfg.intermediate_size, 4)


def test_adapters_round_trip_and_mismatch_is_refused(tmp_path):
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    save_adapters(model, tmp_path / "a")
    fresh = load_adapters(tiny_model(), tmp_path / "a")
    ids, cu = batch(model)
    with torch.no_grad():
        assert torch.equal(fresh(ids, cu), model(ids, cu))
    other = tiny_model()
    apply_lora(other, LoRAConfig(rank=8, alpha=8))
    with pytest.raises(rlvr_fast.CheckpointError, match="--lora-"):
        load_adapters(other, tmp_path / "a")


def test_transformers_loads_merged_model_and_peft_loads_adapters(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok = rlvr_fast.load_pretrained(tiny)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    ids = torch.tensor([tok.encode("12 * 3 = 36, the quick brown fox")])
    with torch.no_grad():
        ours = model(ids)
    rlvr_fast.save_pretrained(model, tok, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)

    peft = pytest.importorskip("peft")  # in the dev extra
    save_adapters(model, tmp_path / "adapter", base_model=str(tiny))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_grad_checkpoint_gives_the_same_adapter_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model()
        apply_lora(model, LoRAConfig(rank=4, alpha=8))
        randomize_adapters(model)
        model.gradient_checkpointing = ckpt
        ids, cu = batch(model)
        model.train()
        model.logits(model.forward_hidden(ids, cu)).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (["--lora-rank", "-1"], "lora-rank"),
    (["--lora-rank", "4", "--lora-targets", "q,lm_head"], "LoRA targets"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "alpha"),
    (["--merge"], "--merge needs LoRA"),
])
def test_bad_lora_options_fail_before_work(tiny, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as exc:
        main(args(tiny, tmp_path / "run", "--steps", "1", *bad))
    assert message in str(exc.value.code) + capsys.readouterr().err


def test_lora_training_run_without_reference_copy(tiny, tmp_path, monkeypatch, capsys):
    from rlvr_fast.grpo import trainer as trainer_mod
    seen = []
    real_logprobs = trainer_mod.GRPOTrainer.token_logprobs

    def spy(self, model, micro_batches, total):
        adapters = [m.enabled for _, m in lora_modules(model)]
        seen.append((self.ref_model, model is self.model, all(adapters), any(adapters)))
        return real_logprobs(self, model, micro_batches, total)

    monkeypatch.setattr(trainer_mod.GRPOTrainer, "token_logprobs", spy)
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "2", "--beta", "0.1", "--lora-rank", "4",
                     "--lora-alpha", "8", "--merge")) == 0
    printed = capsys.readouterr().out
    assert "reference copy" in printed and "none: LoRA, the reference is the model with adapters off" in printed
    # Reference log-probs: no copy, the trained model itself with every adapter switched off.
    assert seen and all(ref is None and same and not on for ref, same, _, on in seen)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kl"] > 0 and records[-1]["peak_memory_gb"] > 0
    ckpt = out / "checkpoint-2"
    assert (ckpt / ADAPTER_FILE).is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(tiny.resolve())
    # The merged model = base + trained adapters.
    base, tok = rlvr_fast.load_pretrained(tiny)
    trained = load_adapters(rlvr_fast.load_pretrained(tiny)[0], ckpt)
    merged, _ = rlvr_fast.load_pretrained(out / "merged")
    ids = torch.tensor([tok.encode("12 * 3 =")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), trained(ids), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(trained(ids), base(ids), atol=1e-4)  # the adapters did train


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_resume_equals_straight_run(tiny, tmp_path, dtype):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--task", "digits-test", "--beta", "0.05", "--num-iterations", "2", "--dtype", dtype,
              "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,v,gate,down", "--grad-checkpoint")
    assert main(args(tiny, straight, *common, "--steps", "4")) == 0
    assert main(args(tiny, split, *common, "--steps", "2")) == 0
    assert main(["--resume", str(split), "--steps", "4"]) == 0
    with safe_open(straight / "checkpoint-4" / ADAPTER_FILE, "pt") as a, \
            safe_open(split / "checkpoint-4" / ADAPTER_FILE, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    drop = ("time", "tokens_per_s", "peak_memory", "step_time")
    clean = lambda path: [{k: v for k, v in json.loads(line).items() if not any(d in k for d in drop)}
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert clean(straight) == clean(split)


def test_reference_logprobs_are_the_base_models(tiny, tmp_path):
    from rlvr_fast.grpo.batching import Sample, make_micro_batch
    from rlvr_fast.grpo.config import TrainConfig
    from rlvr_fast.grpo.trainer import GRPOTrainer
    from tests.test_train import DigitsTask

    cfg = TrainConfig(model=str(tiny), output=str(tmp_path), prompts_per_step=2, group_size=2, max_new_tokens=6,
                      eval_size=2, dtype="float32", beta=0.1, lora_rank=4, lora_alpha=8.0)
    model, tok = rlvr_fast.load_pretrained(tiny)
    trainer = GRPOTrainer(cfg, model, tok, DigitsTask(), tmp_path, torch.device("cpu"))
    assert trainer.ref_model is None
    randomize_adapters(model, std=0.2)
    prompt = tok.encode("12 * 3 =")
    samples = [Sample(prompt, tok.encode(text), 0.5, k, group=0) for k, text in enumerate([" 36", " the fox 12"])]
    mbs = [make_micro_batch(samples, share_prompts=True)]
    base, _ = rlvr_fast.load_pretrained(tiny)
    ref = trainer.reference_logprobs(mbs, len(samples))
    assert torch.equal(ref, trainer.token_logprobs(base, mbs, len(samples)))
    assert not torch.allclose(ref, trainer.token_logprobs(model, mbs, len(samples)), atol=1e-3)  # adapters back on
