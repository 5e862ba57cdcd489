"""bench/shapes.py's random checkpoints (the benches' --random-model): what it writes is the family it says, our
loader and transformers read it as the same model, and the Qwen shapes are the real models' config.json numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlvr_fast import Tokenizer
from rlvr_fast.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import shapes  # noqa: E402

# Qwen3-0.6B's config.json (Qwen/Qwen3-0.6B), the fields that decide speed and memory.
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 model_type="qwen3", qk_norm=True, qkv_bias=False, rope_theta=1000000.0, rms_norm_eps=1e-6)


def test_qwen_shapes_are_the_real_models():
    cfg = shapes.SHAPES["qwen3-0.6b"]
    assert {k: getattr(cfg, k) for k in QWEN3_06B} == QWEN3_06B
    q8, q7 = shapes.SHAPES["qwen3-8b"], shapes.SHAPES["qwen2.5-7b"]
    assert (q8.hidden_size, q8.num_hidden_layers, q8.num_attention_heads, q8.num_key_value_heads, q8.head_dim,
            q8.vocab_size, q8.tie_word_embeddings) == (4096, 36, 32, 8, 128, 151936, False)
    assert (q7.model_type, q7.qkv_bias, q7.hidden_size, q7.intermediate_size, q7.num_attention_heads,
            q7.num_key_value_heads, q7.head_dim, q7.vocab_size) == ("qwen2", True, 3584, 18944, 28, 4, 128, 152064)


# Tiny widths of each Qwen family: Qwen3 (q/k norms), and Qwen2.5-7B's layout (q/k/v biases, untied, GQA 7).
TINY = {"qwen3": shapes.shape("qwen3-tiny"),
        "qwen2": shapes.shape("qwen2.5-7b", hidden_size=112, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=7, num_key_value_heads=1, head_dim=16, vocab_size=320)}


@pytest.mark.parametrize("family", list(TINY))
def test_random_checkpoint_loads_in_ours_and_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    cfg = TINY[family]
    path = shapes.write_random_checkpoint(cfg, tmp_path / "model", dtype=torch.float32)
    ours = load_model(path, dtype=torch.float32)
    assert ours.config.model_type == family and ours.config.qk_norm == (family == "qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    tok = Tokenizer.from_dir(path)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "12 * 34"}], add_generation_prompt=True),
                     add_special_tokens=False)
    assert 0 < len(ids) and max(ids) < cfg.vocab_size  # the small tokenizer's ids exist in the model
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-4, rtol=1e-4)
    assert ours(x).abs().max() > 1.0  # random weights wide enough to give non-trivial logits


def test_command_line_writes_bf16(tmp_path):
    out = subprocess.run([sys.executable, "bench/shapes.py", "qwen3-tiny", str(tmp_path / "q"), "--layers", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    assert load_model(tmp_path / "q").config.num_hidden_layers == 1
    assert not (tmp_path / "q.tok").exists()  # the tokenizer's build directory is not left behind
