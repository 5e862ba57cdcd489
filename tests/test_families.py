"""Every supported family (Llama, Mistral, Qwen2, Qwen3) against transformers' own model class: logits on plain,
packed and shared-prompt batches, greedy rollouts, save/load both ways, sharded checkpoints, a GRPO and a LoRA
step; sliding windows and unsupported architectures refused with a clear message."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rlvr_fast
from rlvr_fast import CheckpointError, RolloutEngine, SamplingParams
from rlvr_fast.checkpoint.load import load_model
from rlvr_fast.model.attention import PackedBatch
from rlvr_fast.model.config import FAMILIES, ConfigError
from rlvr_fast.tokenizer import Tokenizer
from rlvr_fast.train import main
from tests.test_train import args  # noqa: F401  (also registers the digits-test task)
from tests.tiny import make_tiny_checkpoint, write_tokenizer_files

transformers = pytest.importorskip("transformers")

VOCAB = 320  # the tiny tokenizer's
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=[2, 0])  # a list, as Qwen's <|im_end|> and <|endoftext|>
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# case -> (model_type, transformers config overrides). The first four are the families; the rest vary switches.
CASES = {
    "llama": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=200, tie_word_embeddings=False)),  # window longer than any test sequence
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=True)),  # head_dim != hidden / heads (12)
    "qwen2_untied_window_off": ("qwen2", dict(tie_word_embeddings=False, use_sliding_window=False, sliding_window=8)),
    "qwen3_attention_bias": ("qwen3", dict(head_dim=8, attention_bias=True, tie_word_embeddings=False)),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
}
FAMILY_CASES = list(FAMILIES)


def hf_model(case: str, seed: int = 0, **extra):
    """A random transformers model of the case's family (its own class, e.g. Qwen3ForCausalLM)."""
    model_type, overrides = CASES[case]
    # transformers may edit the dicts it is given (rope settings): hand it copies.
    cfg = transformers.AutoConfig.for_model(model_type, **copy.deepcopy({**BASE, **overrides, **extra}))
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert type(hf).__name__ == FAMILIES[model_type]
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)  # large enough that logits are far from uniform
    return hf


def hf_checkpoint(path, case: str, max_shard_size: str | None = None, **extra):
    """hf_model saved by transformers with the tiny tokenizer; returns (dir, hf_model)."""
    hf = hf_model(case, **extra)
    hf.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    write_tokenizer_files(path, VOCAB)
    return path, hf


def ids_batch(shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# Every case from one file; each family also from shards that transformers wrote (model.safetensors.index.json).
@pytest.mark.parametrize("case, shard", [(c, None) for c in CASES] + [(f, "60KB") for f in FAMILY_CASES])
def test_logits_match_transformers(tmp_path, case, shard):
    path, hf = hf_checkpoint(tmp_path, case, max_shard_size=shard)
    assert (path / "model.safetensors.index.json").is_file() == (shard is not None)
    model = load_model(path)
    assert model.config.model_type == CASES[case][0]
    ids = ids_batch((3, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_packed_and_shared_prompt_logits_match_transformers(tmp_path, family):
    path, hf = hf_checkpoint(tmp_path, family)
    model = load_model(path)
    seqs = [ids_batch((n,), seed=n) for n in (5, 1, 12, 7)]
    cu = torch.tensor([0, 5, 6, 18, 25], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu)
        want = torch.cat([hf(s[None]).logits[0] for s in seqs])
        torch.testing.assert_close(packed, want, atol=2e-5, rtol=1e-5)

        # Shared-prompt layout (the trainer's): prompts first, then their completions.
        prompts = [ids_batch((6,), seed=10), ids_batch((3,), seed=11)]
        completions = [[ids_batch((4,), seed=12), ids_batch((2,), seed=13)], [ids_batch((5,), seed=14)]]
        batch = PackedBatch.shared_prompt([6, 3], [[4, 2], [5]])
        flat = torch.cat(prompts + [c for comps in completions for c in comps])
        got = model.logits(model.forward_packed(flat, batch))
        want = [hf(p[None]).logits[0] for p in prompts]
        want += [hf(torch.cat([p, c])[None]).logits[0, len(p):]
                 for p, comps in zip(prompts, completions) for c in comps]
        torch.testing.assert_close(got, torch.cat(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_transformers_loads_what_we_save_as_the_same_family(tmp_path, family, dtype):
    src, _ = hf_checkpoint(tmp_path / "src", family)
    model, tok = rlvr_fast.load_pretrained(src, dtype=dtype)
    out = rlvr_fast.save_pretrained(model, tok, tmp_path / "saved", max_shard_bytes=60_000)  # sharded
    assert (out / "model.safetensors.index.json").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == family and saved["architectures"] == [FAMILIES[family]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    assert type(hf).__name__ == FAMILIES[family]
    ours = model.state_dict()
    theirs = hf.state_dict()
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        assert t.dtype == dtype and torch.equal(t, ours[name]), name
    again = load_model(out, dtype=dtype)  # and we read back what we wrote
    assert again.config.to_dict() == model.config.to_dict()
    if dtype == torch.float32:
        ids = ids_batch((2, 23))
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=1e-5)


# ---- rollouts and training ----

@pytest.mark.parametrize("family", FAMILY_CASES)
def test_greedy_rollout_equals_transformers_generate(tmp_path, family):
    path, hf = hf_checkpoint(tmp_path, family)
    model, tok = rlvr_fast.load_pretrained(path)
    engine = RolloutEngine(model, tok, num_blocks=64, block_size=4)
    eos = sorted(engine.eos_token_ids)
    assert {0, 2} <= set(eos)  # config.json's list and the tokenizer's eos_token
    prompts = [ids_batch((n,), seed=n).tolist() for n in (1, 6, 13)]
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16), n=2)
    for prompt, group in zip(prompts, out):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=2)
        want = ref[0, len(prompt):].tolist()
        cut = [i for i, t in enumerate(want) if t in eos]
        want = want[:cut[0] + 1] if cut else want
        for c in group:
            assert c.token_ids == want


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_every_listed_eos_id_ends_a_completion(tmp_path, where):
    path, _ = hf_checkpoint(tmp_path, "qwen2")
    model, tok = rlvr_fast.load_pretrained(path)
    prompt = ids_batch((9,)).tolist()
    free = RolloutEngine(model, tok).generate(prompt, SamplingParams(temperature=0, max_new_tokens=12,
                                                                     ignore_eos=True))[0][0].token_ids
    k = next(i for i in range(2, 12) if free[i] not in free[:i])  # a token greedy decoding first picks at step k
    assert not {0, 2} & set(free[:k])
    file = path / where
    cfg = json.loads(file.read_text()) if file.is_file() else {}
    cfg["eos_token_id"] = [2, free[k]]  # e.g. Qwen's <|im_end|> and <|endoftext|>
    file.write_text(json.dumps(cfg))
    model, tok = rlvr_fast.load_pretrained(path)
    c = RolloutEngine(model, tok).generate(prompt, SamplingParams(temperature=0, max_new_tokens=12))[0][0]
    assert c.token_ids == free[:k + 1] and c.finish_reason == "eos"


TINY_FAMILY = {"llama": dict(rope_scaling=LLAMA3_ROPE), "mistral": dict(sliding_window=4096), "qwen2": {},
               "qwen3": dict(head_dim=24)}


@pytest.mark.parametrize("lora", [False, True], ids=["grpo", "lora"])
@pytest.mark.parametrize("family", FAMILY_CASES)
def test_a_training_step_changes_the_weights(tmp_path, family, lora):
    from rlvr_fast.checkpoint.adapters import load_adapters
    tiny = make_tiny_checkpoint(tmp_path / "model", family=family, **TINY_FAMILY[family])
    extra = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q,k,v,o,gate,up,down"] if lora else []
    assert main(args(tiny, tmp_path / "run", "--task", "digits-test", "--steps", "1", *extra)) == 0
    base, tok = rlvr_fast.load_pretrained(tiny)
    ckpt = tmp_path / "run" / "checkpoint-1"
    trained = load_adapters(rlvr_fast.load_pretrained(tiny)[0], ckpt) if lora else rlvr_fast.load_pretrained(ckpt)[0]
    assert trained.config.model_type == family
    ids = torch.tensor([tok.encode("12 * 3 =")])
    with torch.no_grad():
        assert not torch.allclose(trained(ids), base(ids), atol=1e-5)
    q = trained.model.layers[0].self_attn.q_proj
    assert (q.bias is not None) == (family == "qwen2")


def test_a_run_outgrowing_the_window_is_refused_with_one_error_line(tmp_path, capsys):
    tiny = make_tiny_checkpoint(tmp_path / "model", family="mistral", sliding_window=6)
    with pytest.raises(SystemExit, match="--max-new-tokens 6 plus a prompt is longer than this mistral checkpoint's "
                                         "sliding attention window of 6 tokens"):
        main(args(tiny, tmp_path / "run", "--task", "digits-test", "--steps", "1"))
    assert not (tmp_path / "run").exists()
    # A window the completions fit in but the chat-templated prompts do not: refused at the first rollout.
    tiny = make_tiny_checkpoint(tmp_path / "model8", family="mistral", sliding_window=8)
    assert main(args(tiny, tmp_path / "run8", "--task", "digits-test", "--steps", "1")) == 1
    assert "checkpoint's sliding attention window of 8 tokens" in capsys.readouterr().err


# ---- sliding windows: exact up to the window, refused beyond it ----

def test_mistral_window_is_exact_up_to_its_length_and_refused_beyond(tmp_path):
    path, hf = hf_checkpoint(tmp_path, "mistral", sliding_window=16)
    model, tok = rlvr_fast.load_pretrained(path)
    ids = ids_batch((2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=2e-5, rtol=1e-5)
        with pytest.raises(ConfigError, match="17 tokens is longer than this mistral checkpoint's sliding attention "
                                              "window of 16 tokens"):
            model(ids_batch((1, 17)))
        with pytest.raises(ConfigError, match="window of 16"):  # packed: the longest sequence counts
            model(ids_batch((20,)), cu_seqlens=torch.tensor([0, 3, 20], dtype=torch.int32))
        with pytest.raises(ConfigError, match="window of 16"):  # shared prompt: prompt + completion counts
            model.forward_packed(ids_batch((18,)), PackedBatch.shared_prompt([10], [[8]]))
    engine = RolloutEngine(model, tok, num_blocks=32, block_size=4)
    assert len(engine.generate([[5] * 10], SamplingParams(temperature=0, max_new_tokens=6))[0][0].token_ids) <= 6
    with pytest.raises(ConfigError, match="lower --max-new-tokens"):  # refused before any token is generated
        engine.generate([[5] * 10], SamplingParams(temperature=0, max_new_tokens=7))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_window_counts_only_when_a_layer_slides(tmp_path, family):
    # use_sliding_window with max_window_layers 1: layer 1 of 2 slides, so lengths beyond the window are refused.
    path, hf = hf_checkpoint(tmp_path / "on", family, use_sliding_window=True, sliding_window=12, max_window_layers=1)
    model = load_model(path)
    assert model.config.attention_window == 12
    with torch.no_grad():
        torch.testing.assert_close(model(ids_batch((1, 12))), hf(ids_batch((1, 12))).logits, atol=2e-5, rtol=1e-5)
        with pytest.raises(ConfigError, match=f"{family} checkpoint's sliding attention window of 12"):
            model(ids_batch((1, 13)))
    # The window is on but no layer uses it (max_window_layers >= layers): every length runs, as in transformers.
    path, hf = hf_checkpoint(tmp_path / "unused", family, use_sliding_window=True, sliding_window=12,
                             max_window_layers=2)
    model = load_model(path)
    assert model.config.attention_window is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids_batch((1, 30))), hf(ids_batch((1, 30))).logits, atol=2e-5, rtol=1e-5)


# ---- anything else: one clear error naming what was found and what is supported ----

SUPPORTED = r"LlamaForCausalLM \(model_type 'llama'\), MistralForCausalLM .*Qwen3ForCausalLM \(model_type 'qwen3'\)"


@pytest.mark.parametrize("model_type, archs", [
    ("gemma2", ["Gemma2ForCausalLM"]),
    ("qwen2_vl", ["Qwen2VLForConditionalGeneration"]),  # a vision model
    ("qwen2", ["Qwen2ForSequenceClassification"]),      # a known family, another head
    ("no_such_model", []),
])
def test_other_architectures_are_refused(tmp_path, model_type, archs):
    src = make_tiny_checkpoint(tmp_path / "m", family="qwen2")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=archs)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        rlvr_fast.load_pretrained(src)
    message = str(info.value)
    assert "\n" not in message and f"model_type={model_type!r}" in message
    assert all(a in message for a in archs)
    assert pytest.raises(CheckpointError, rlvr_fast.load_pretrained, src).match(SUPPORTED)


def test_unknown_rope_type_is_refused(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", family="qwen3")
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"rope scaling type 'yarn' is not supported \(supported: default"):
        rlvr_fast.load_pretrained(src)


def test_a_switch_the_family_cannot_save_is_refused():
    with pytest.raises(ConfigError, match="a qwen2 model cannot have {'o_bias': True}"):
        rlvr_fast.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=4, model_type="qwen2",
                              qkv_bias=True, o_bias=True)
