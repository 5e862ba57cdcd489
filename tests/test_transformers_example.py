"""README's "fused GRPO loss in your own training loop" example runs on a transformers model.

The example's model name becomes a tiny random transformers Llama written here (no hub), and its
reward ("408" in the text, which a random model never writes) becomes one a random model earns
about half the time, so the loop has a learning signal: after it, the policy's weights moved.
"""

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.tiny import write_tokenizer_files  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def example_code() -> str:
    match = re.search(r"<!-- transformers-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md lost its <!-- transformers-example --> python block"
    return match.group(1)


def test_the_example_is_short():
    lines = example_code().splitlines()
    assert len(lines) < 30, f"the README promises an example under 30 lines; it has {len(lines)}"


def test_the_example_trains_a_transformers_model(tmp_path, capsys):
    path = tmp_path / "tiny-hf"
    write_tokenizer_files(path, vocab_size=320)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    code = example_code()
    assert code.count('"HuggingFaceTB/SmolLM2-135M-Instruct"') == 1 and code.count('"408" in tok.decode(c)') == 1
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(path)))
    code = code.replace('"408" in tok.decode(c)', "len(c) % 2 == 1 or c[0] % 2 == 1")  # a coin a policy can learn
    scope: dict = {"__name__": "readme_transformers_example"}
    exec(compile(code, str(README), "exec"), scope)

    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["0", "1", "2", "3"], out
    trained = scope["model"].state_dict()
    moved = [k for k in before if not torch.equal(before[k], trained[k])]
    assert moved, "no weight changed: the loss gave no gradient"
    assert all(torch.isfinite(v).all() for v in trained.values())
    ref = scope["ref"].state_dict()
    assert all(torch.equal(before[k], ref[k]) for k in before), "the frozen reference changed"
