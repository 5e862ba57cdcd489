"""The project's model on the real embedded default model (SmolLM2-135M-Instruct) against transformers."""

import pytest
import torch

import rlvr_fast

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "Please answer the following question. You may write out your argument before stating your final answer X in a "
    "new line, following the format \"Final Answer: the final answer is X. I hope it is correct.\" 1497 * 63",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "🙂 Unicode and  spaces\n\nnew lines",
]


@pytest.fixture(scope="module")
def models(default_model_path):
    ours, tok = rlvr_fast.load_pretrained(default_model_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    return ours, theirs, tok


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_logits_match_transformers(models, prompt):
    ours, theirs, tok = models
    text = tok.apply_chat_template([{"role": "user", "content": prompt}])
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # 30 layers of fp32: allow a little accumulation
    assert a[0, -1].argmax() == b[0, -1].argmax()


def test_default_model_packed_batch_matches_transformers(models):
    ours, theirs, tok = models
    seqs = [tok.encode(p) for p in PROMPTS]
    cu = torch.tensor([0] + list(torch.tensor([len(s) for s in seqs]).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        packed = ours(torch.tensor([t for s in seqs for t in s]), cu_seqlens=cu)
        for i, s in enumerate(seqs):
            ref = theirs(torch.tensor([s])).logits[0]
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], ref, atol=1e-4, rtol=1e-4)


def test_default_config(default_model_path):
    model, tok = rlvr_fast.load_pretrained(default_model_path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (30, 9, 3, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
