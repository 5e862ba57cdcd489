"""The project's Llama against transformers' LlamaForCausalLM, packed batches, save/load round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rlvr_fast
from rlvr_fast.checkpoint.load import load_model
from tests.tiny import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "gqa_tied": dict(tie_word_embeddings=True),
    "gqa_untied": dict(tie_word_embeddings=False),
    "mha": dict(num_key_value_heads=4),
    "mqa_head_dim_given": dict(num_key_value_heads=1, head_dim=16),  # head_dim != hidden/heads
    "llama3_rope": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


def hf_checkpoint(tmp_path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """A random transformers LlamaForCausalLM saved to safetensors; returns (dir, hf_model)."""
    # transformers may edit the dicts it is given (rope settings): hand it copies.
    cfg = transformers.LlamaConfig(**copy.deepcopy({**BASE, **overrides}))
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(tmp_path, **kwargs)
    return tmp_path, hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    path, hf = hf_checkpoint(tmp_path, **CONFIGS[name])
    model = load_model(path)
    ids = torch.randint(0, BASE["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (3, 40, BASE["vocab_size"])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    path, hf = hf_checkpoint(tmp_path, max_shard_size="60KB", tie_word_embeddings=False)
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path)
    ids = torch.randint(0, BASE["vocab_size"], (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=2e-5, rtol=1e-5)


def test_packed_forward_equals_each_sequence_alone(tmp_path):
    path, _ = hf_checkpoint(tmp_path)
    model = load_model(path)
    lengths = [5, 1, 12, 7]
    seqs = [torch.randint(0, BASE["vocab_size"], (n,)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu)
        alone = torch.cat([model(s[None])[0] for s in seqs])
    assert packed.shape == (sum(lengths), BASE["vocab_size"])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_packed_forward_gradients_flow(tmp_path):
    path, _ = hf_checkpoint(tmp_path)
    model = load_model(path).train()
    ids = torch.randint(0, BASE["vocab_size"], (9,))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    model(ids, cu_seqlens=cu).logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    src = make_tiny_checkpoint(tmp_path / "src", tie_word_embeddings=False)
    model, tok = rlvr_fast.load_pretrained(src, dtype=dtype)
    out = rlvr_fast.save_pretrained(model, tok, tmp_path / "saved")
    again, tok2 = rlvr_fast.load_pretrained(out, dtype=dtype)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype
        assert torch.equal(a[name], b[name]), name
    assert tok2.encode("1497 * 63") == tok.encode("1497 * 63")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_saving_overwrites_atomically(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src")
    model, tok = rlvr_fast.load_pretrained(src)
    out = tmp_path / "ckpt"
    rlvr_fast.save_pretrained(model, tok, out)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    rlvr_fast.save_pretrained(model, tok, out)
    again = load_model(out)
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_what_we_save(tmp_path, tied):
    src = make_tiny_checkpoint(tmp_path / "src", tie_word_embeddings=tied, rope_scaling=LLAMA3_ROPE)
    model, tok = rlvr_fast.load_pretrained(src)
    out = rlvr_fast.save_pretrained(model, tok, tmp_path / "saved", max_shard_bytes=100_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("Final Answer: 94311") == tok.encode("Final Answer: 94311")


# ---- bad input: a clear CheckpointError naming the problem, never a deep traceback ----

def test_missing_directory(tmp_path):
    with pytest.raises(rlvr_fast.CheckpointError, match="does not exist"):
        rlvr_fast.load_pretrained(tmp_path / "nope")


def test_missing_config(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m")
    (src / "config.json").unlink()
    with pytest.raises(rlvr_fast.CheckpointError, match="no config.json"):
        rlvr_fast.load_pretrained(src)


def test_not_a_llama(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rlvr_fast.CheckpointError, match="Llama-family"):
        rlvr_fast.load_pretrained(src)


def test_config_missing_field(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rlvr_fast.CheckpointError, match="hidden_size"):
        rlvr_fast.load_pretrained(src)


def test_truncated_safetensors(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(rlvr_fast.CheckpointError, match="truncated or corrupt"):
        rlvr_fast.load_pretrained(src)


def test_missing_weights_file(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m")
    (src / "model.safetensors").unlink()
    with pytest.raises(rlvr_fast.CheckpointError, match="neither model.safetensors"):
        rlvr_fast.load_pretrained(src)


def test_wrong_shape_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    src = make_tiny_checkpoint(tmp_path / "m")
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, src / "model.safetensors")
    with pytest.raises(rlvr_fast.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[3, 3\]"):
        rlvr_fast.load_pretrained(src)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    src = make_tiny_checkpoint(tmp_path / "m")
    state = load_file(src / "model.safetensors")
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, src / "model.safetensors")
    with pytest.raises(rlvr_fast.CheckpointError, match=r"lacks 1 tensor\(s\).*k_proj"):
        rlvr_fast.load_pretrained(src)


def test_missing_tokenizer(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m")
    (src / "tokenizer.json").unlink()
    with pytest.raises(rlvr_fast.TokenizerError, match="no tokenizer.json"):
        rlvr_fast.load_pretrained(src)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    path, _ = hf_checkpoint(tmp_path)
    grads = []
    ids, cu = torch.randint(0, BASE["vocab_size"], (11,)), torch.tensor([0, 4, 11], dtype=torch.int32)
    for checkpointing in (False, True):
        model = load_model(path).train()
        model.gradient_checkpointing = checkpointing
        model(ids, cu_seqlens=cu).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
