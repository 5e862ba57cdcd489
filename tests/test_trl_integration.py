"""rlvr_fast.integrations.trl against TRL's own GRPOTrainer._compute_loss (TRL is the oracle).

A tiny random transformers Llama (fp32, CPU) is saved to a temporary folder so TRL can load it (and
its reference model) by path. Inputs come from the trainer's own `_generate_and_score_completions`
on a small batch; old/ref log-probs are then perturbed so that ratios clip and the KL is not zero.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration needs trl (pip install trl)")
transformers = pytest.importorskip("transformers")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

from rlvr_fast.integrations.trl import FusedGRPOTrainer, fused_compute_loss, use_fused_grpo_loss  # noqa: E402
from tests.tiny import tiny_tokenizer  # noqa: E402

PROMPTS = ["1497 * 63", "The quick brown fox", "12 + 99 =", "user: say 100"]
G = 4  # completions per prompt
METRICS = ("entropy", "clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
           "clip_ratio/region_mean")


def toy_reward(completions, **_):
    return [float(len(c) % 3) for c in completions]  # any spread of rewards, so advantages are not all 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf_llama")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def accelerator_state():
    """Every TrainingArguments resets accelerate's process-wide state and a trainer re-creates it; a test that
    only builds a config (the refusals) would leave the module's shared trainer without one."""
    yield
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if not AcceleratorState._shared_state:
        Accelerator(cpu=True)


def make_config(tmp_path, **kw) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=G, max_completion_length=8,
                report_to="none", use_cpu=True, logging_steps=1, max_steps=2, beta=0.0, seed=0,
                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, bf16=False)
    base.update(kw)
    return GRPOConfig(**base)


def dataset():
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({"prompt": PROMPTS * 2})


@pytest.fixture(scope="module")
def trainer_and_batch(model_dir, tmp_path_factory):
    """One trainer (beta=0: no ref model) and one real generation batch of 16 completions, with ratios != 1."""
    args = make_config(tmp_path_factory.mktemp("out"), per_device_train_batch_size=16,
                       temperature=0.9, epsilon=0.2)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=toy_reward, args=args, train_dataset=dataset())
    trainer.model.train()
    torch.manual_seed(1)
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    # A random tiny model rarely samples EOS: end some completions early by hand, the way TRL masks
    # after an EOS (padding ids, mask 0), and mask one completion entirely (mask_truncated_completions).
    mask = batch["completion_mask"]
    assert mask.shape == (16, 8)
    for row, length in ((1, 3), (4, 6), (7, 1), (10, 0), (13, 5)):
        mask[row, length:] = 0
        batch["completion_ids"][row, length:] = trainer.processing_class.pad_token_id
    with torch.no_grad():  # the current policy's log-probs (TRL's head), then old / ref around them
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], mask], 1), batch["completion_ids"].size(1))
    g = torch.Generator().manual_seed(2)
    batch["old_per_token_logps"] = logp + 0.4 * torch.randn(logp.shape, generator=g)
    batch["ref_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    return trainer, batch


def configure(trainer, **opts):
    """Set loss options on the trainer the way __init__ does (args and the trainer's copies)."""
    args = trainer.args
    for name in ("loss_type", "importance_sampling_level", "beta", "delta", "epsilon", "epsilon_high"):
        if name in opts:
            setattr(args, name, opts[name])
    trainer.loss_type = args.loss_type
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.beta = args.beta
    args.use_bias_correction_kl = False  # TRL's default (True) weights the KL by the ratio: refused with beta != 0
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon


def loss_and_grads(fn, trainer, micro_batches):
    """Sum of fn's losses over the micro-batches, each backward'ed (an accumulation window), and every grad."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    for key in list(trainer._metrics["train"]):
        del trainer._metrics["train"][key]
    total = 0.0
    for mb in micro_batches:
        loss = fn(trainer, model, mb)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return total, grads, copy.deepcopy(dict(trainer._metrics["train"]))


def compare(trainer, batch, accumulation=1, check_metrics=False, steps_per_generation=None, **opts):
    configure(trainer, **opts)
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = steps_per_generation or accumulation
    micro = split_tensor_dict(batch, accumulation) if accumulation > 1 else [batch]
    ref_loss, ref_grads, ref_metrics = loss_and_grads(GRPOTrainer._compute_loss, trainer, micro)
    loss, grads, metrics = loss_and_grads(fused_compute_loss, trainer, micro)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), opts
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert scale > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{name} {opts}: {m}")
    assert set(metrics) == set(ref_metrics), (set(metrics) ^ set(ref_metrics))
    if check_metrics:
        for name in metrics:
            assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5, abs=1e-6), name
    return ref_metrics


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", beta=0.1, epsilon_high=0.28),
    dict(loss_type="dr_grpo", beta=0.04),
    dict(loss_type="dr_grpo", delta=1.5, epsilon_high=0.3),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="dapo", beta=0.04, delta=1.4),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.04, epsilon=0.05),
    dict(loss_type="dapo", importance_sampling_level="sequence", delta=1.1, epsilon=0.05, epsilon_high=0.08),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_trl_loss_and_grads(trainer_and_batch, opts):
    trainer, batch = trainer_and_batch
    base = dict(loss_type="grpo", importance_sampling_level="token", beta=0.0, delta=None, epsilon=0.2,
                epsilon_high=None)
    metrics = compare(trainer, batch, check_metrics=True, **{**base, **opts})
    # the batch really exercises the clip (else the comparison would not test it)
    assert metrics["clip_ratio/region_mean"][0] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_matches_trl(trainer_and_batch, loss_type):
    """Two micro-batches per window (TRL's num_items_in_batch / accumulation normalisation), one of them
    also without old_per_token_logps (num_iterations == 1: TRL uses the detached log-probs)."""
    trainer, batch = trainer_and_batch
    # steps_per_generation 4: the generation batch spans two accumulation windows (dapo's normaliser halves)
    compare(trainer, batch, accumulation=2, steps_per_generation=4, check_metrics=True, loss_type=loss_type, beta=0.04,
            importance_sampling_level="token", delta=None, epsilon=0.2, epsilon_high=0.28)
    no_old = {k: v for k, v in batch.items() if k != "old_per_token_logps"}
    trainer.current_gradient_accumulation_steps = 2
    micro = split_tensor_dict(no_old, 2)
    ref_loss, ref_grads, _ = loss_and_grads(GRPOTrainer._compute_loss, trainer, micro)
    loss, grads, _ = loss_and_grads(fused_compute_loss, trainer, micro)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6)


def test_metrics_values_match_trl(trainer_and_batch):
    trainer, batch = trainer_and_batch
    for level in ("token", "sequence"):
        metrics = compare(trainer, batch, check_metrics=True, loss_type="bnpo", beta=0.04, delta=None, epsilon=0.1,
                          epsilon_high=0.15, importance_sampling_level=level)
        assert {"kl", *METRICS} <= set(metrics)


def test_train_end_to_end_logs_trl_metrics(model_dir, tmp_path, monkeypatch):
    """A few optimizer steps of FusedGRPOTrainer.train(); TRL's chunked head runs only under no_grad (old/ref
    log-probs), never for the loss."""
    import trl.trainer.utils as trl_utils

    head_calls = []
    original = trl_utils._ChunkedLogProbFunction.apply

    def counting_apply(*a):
        head_calls.append(torch.is_grad_enabled())
        return original(*a)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting_apply)
    args = make_config(tmp_path, beta=0.04, use_bias_correction_kl=False, loss_type="dapo",
                       gradient_accumulation_steps=2,
                       per_device_train_batch_size=4, num_iterations=2)
    trainer = FusedGRPOTrainer(model=str(model_dir), reward_funcs=toy_reward, args=args, train_dataset=dataset())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert {"kl", *METRICS} <= set(h), set(h)
        assert all(h[m] == h[m] for m in ("kl", *METRICS))  # not NaN
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert head_calls and not any(head_calls), head_calls  # old + ref log-probs only, all without grad


REFUSED = [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(loss_type="vespo"), "loss_type='vespo'"),
    (dict(loss_type="luspo"), "loss_type='luspo'"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
    (dict(entropy_coef=0.01), "entropy_coef=0.01"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy=True"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
    (dict(use_bias_correction_kl=True, beta=0.04), "use_bias_correction_kl=True"),
    (dict(delta=1.1), "delta=1.1"),
]


@pytest.mark.parametrize("opts,needle", REFUSED, ids=[n for _, n in REFUSED])
def test_refuses_unsupported_options_at_construction(model_dir, tmp_path, opts, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")) as info:
        FusedGRPOTrainer(model=str(model_dir), reward_funcs=toy_reward, args=make_config(tmp_path, **opts),
                         train_dataset=dataset())
    assert "TRL's own GRPOTrainer" in str(info.value)


def test_patch_refuses_and_patches(trainer_and_batch):
    trainer, batch = trainer_and_batch
    configure(trainer, loss_type="grpo", importance_sampling_level="token", beta=0.0, delta=None, epsilon=0.2,
              epsilon_high=None)
    other = copy.copy(trainer)
    other.args = copy.copy(trainer.args)
    other.args.loss_type = other.loss_type = "cispo"
    with pytest.raises(ValueError, match="loss_type='cispo'"):
        use_fused_grpo_loss(other)
    other.args.loss_type = other.loss_type = "grpo"
    other.top_entropy_quantile = 0.5  # changed on the trainer only: TRL's loss would use it
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        use_fused_grpo_loss(other)
    other.top_entropy_quantile = 1.0
    patched = use_fused_grpo_loss(other)
    assert patched._compute_loss.__func__ is fused_compute_loss
    bad = dict(batch, advantages=batch["advantages"][:, None].expand_as(batch["completion_mask"]))
    with pytest.raises(ValueError, match="advantages.shape"):
        patched._compute_loss(patched.model, bad)
    with pytest.raises(ValueError, match="pixel_values"):
        patched._compute_loss(patched.model, dict(batch, pixel_values=torch.zeros(1)))


def test_tool_mask_matches_trl(trainer_and_batch):
    """Tool-call tokens (tool_mask 0) are left out of the loss, as in TRL."""
    trainer, batch = trainer_and_batch
    tool_mask = torch.ones_like(batch["completion_mask"])
    tool_mask[0, 2:5] = 0
    tool_mask[5, :4] = 0
    compare(trainer, dict(batch, tool_mask=tool_mask), check_metrics=True, loss_type="bnpo", beta=0.04, delta=None,
            epsilon=0.2, epsilon_high=None, importance_sampling_level="token")


def test_peft_lora_matches_trl(model_dir, tmp_path, trainer_and_batch):
    peft = pytest.importorskip("peft")
    _, batch = trainer_and_batch
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=toy_reward, args=make_config(tmp_path),
                          train_dataset=dataset(), peft_config=lora)
    trainer.model.train()
    for name, p in trainer.model.named_parameters():  # LoRA B starts at 0: make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    use_fused_grpo_loss(trainer)
    batch = {k: v for k, v in batch.items() if k != "ref_per_token_logps"}
    compare(trainer, batch, check_metrics=True, loss_type="grpo", beta=0.0, delta=None, epsilon=0.2,
            epsilon_high=None, importance_sampling_level="sequence")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_backend_matches_trl(trainer_and_batch, level):
    """The CUDA path's kernels (Triton interpreter on CPU): they keep padding rows, which hold TRL's zeros."""
    trainer, batch = trainer_and_batch
    trainer._rlvr_fast_loss_kwargs = {"backend": "triton"}
    try:
        compare(trainer, batch, check_metrics=True, loss_type="dapo", beta=0.04, delta=1.5, epsilon=0.2,
                epsilon_high=0.28, importance_sampling_level=level)
    finally:
        del trainer._rlvr_fast_loss_kwargs


def test_bf16_autocast_close_to_trl(trainer_and_batch):
    """Under bf16 autocast (TRL's default on GPU) both heads compute the logits in bf16: close, not equal."""
    trainer, batch = trainer_and_batch
    configure(trainer, loss_type="dapo", beta=0.04, delta=None, epsilon=0.2, epsilon_high=0.28,
              importance_sampling_level="token")
    trainer.current_gradient_accumulation_steps = trainer.args.steps_per_generation = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads, _ = loss_and_grads(GRPOTrainer._compute_loss, trainer, [batch])
        loss, grads, _ = loss_and_grads(fused_compute_loss, trainer, [batch])
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, g in grads.items():
        err = (g - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 0.02, (name, err.item())  # measured <= 0.6 %


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_eval_mode_matches_trl(trainer_and_batch, loss_type):
    """prediction_step's path: no_grad, model.eval(), no accumulation factor, metrics under 'eval'."""
    trainer, batch = trainer_and_batch
    configure(trainer, loss_type=loss_type, beta=0.04, delta=None, epsilon=0.2, epsilon_high=None,
              importance_sampling_level="token")
    trainer.current_gradient_accumulation_steps, trainer.args.steps_per_generation = 4, 2  # unused in eval
    trainer.model.eval()
    try:
        results = []
        for fn in (GRPOTrainer._compute_loss, fused_compute_loss):
            trainer._metrics["eval"].clear()
            with torch.no_grad():
                results.append((fn(trainer, trainer.model, batch).item(), dict(trainer._metrics["eval"])))
    finally:
        trainer.model.train()
    (ref_loss, ref_metrics), (loss, metrics) = results
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5, abs=1e-6), name
