"""The tokenizer against transformers' tokenizer for the same files: ids, decoding, chat template text."""

from __future__ import annotations

import json

import pytest

from rlvr_fast import Tokenizer, TokenizerError
from tests.tiny import write_tokenizer_files

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Please answer the following question. 1497 * 63",
    "Final Answer: the final answer is 94311. I hope it is correct.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "unicode: café, naïve, 数学, emoji 🙂",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 * 34?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "1497 * 63"},
     {"role": "assistant", "content": "94311"}, {"role": "user", "content": "Sure? 🙂"}],
]
# Exercises what real templates use: bos_token, tojson on non-ASCII, loop controls, raise_exception.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% if m['content'] == 'skip' %}{% continue %}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if tools is not none %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture
def tiny_dir(tmp_path):
    write_tokenizer_files(tmp_path)
    return tmp_path


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_and_decoding_match_transformers(tiny_dir, add_special_tokens):
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == theirs.encode(text, add_special_tokens=add_special_tokens), text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_special_token_ids(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.stop_token_ids == [tok.eos_token_id]
    assert tok.bos_token_id is None


@pytest.mark.parametrize("gen_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chatml_template_matches_transformers(tiny_dir, conversation, gen_prompt):
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    expected = theirs.apply_chat_template(conversation, add_generation_prompt=gen_prompt, tokenize=False)
    assert ours.apply_chat_template(conversation, add_generation_prompt=gen_prompt) == expected


def test_llama3_style_template_matches_transformers(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg.update(chat_template=LLAMA3_STYLE_TEMPLATE, bos_token="<|endoftext|>")
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tiny_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    conv = CONVERSATIONS[1] + [{"role": "user", "content": "skip"}]
    tools = [{"name": "météo", "parameters": {"city": "Zürich"}}]
    expected = theirs.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(conv, tools=tools) == expected
    assert "Zürich" in expected
    assert ours.bos_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.stop_token_ids == [1, 2]  # generation_config's list, with the tokenizer's eos
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    # Older checkpoints store special tokens as AddedToken dicts.
    cfg["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tiny_dir).apply_chat_template(conv, tools=tools) == expected


def test_no_template_is_a_clear_error(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat_template"):
        Tokenizer.from_dir(tiny_dir).apply_chat_template(CONVERSATIONS[0])


def test_corrupt_tokenizer_json(tiny_dir):
    (tiny_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer.from_dir(tiny_dir)


# ---- chat templates of the supported families, written here in the style of each (not the vendors' files) ----

# Qwen2.5 style: ChatML, a default system message, tools listed as JSON lines in the system turn, tool calls and
# consecutive tool results folded into one user turn.
QWEN25_STYLE_TEMPLATE = """{%- set default_system = 'You are a careful assistant who checks every product.' %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = default_system %}
    {%- set rest = messages %}
{%- endif %}
{{- '<|im_start|>system\\n' + system }}
{%- if tools %}
    {{- '\\n\\n# Tools\\n\\nThese functions are available:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nTo call one, reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in rest %}
    {%- if message['role'] == 'tool' %}
        {%- if loop.first or rest[loop.index0 - 1]['role'] != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}
        {%- if loop.last or rest[loop.index0 + 1]['role'] != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] %}
        {{- '<|im_start|>assistant' }}
        {%- if message['content'] %}
            {{- '\\n' + message['content'] }}
        {%- endif %}
        {%- for call in message['tool_calls'] %}
            {%- set fn = call['function'] %}
            {{- '\\n<tool_call>\\n{"name": "' + fn['name'] + '", "arguments": ' + fn['arguments'] | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3 style: no default system message, reasoning kept only after the last user turn (found by a reversed
# loop and a namespace), an empty think block when enable_thinking is false.
QWEN3_STYLE_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content }}
    {%- if tools %}
        {{- '\\n\\n' }}
    {%- endif %}
{%- elif tools %}
    {{- '<|im_start|>system\\n' }}
{%- endif %}
{%- if tools %}
    {{- '# Tools\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>' }}
{%- endif %}
{%- if messages[0].role == 'system' or tools %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages[::-1] %}
    {%- if ns.last_user < 0 and message.role == 'user' %}
        {%- set ns.last_user = messages | length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is defined else '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content }}
        {%- for call in message.tool_calls or [] %}
            {{- '\\n<tool_call>\\n' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Mistral style: [INST] turns after the BOS, the system message folded into the last user turn, tools announced
# before it, an EOS after every assistant turn, other roles refused.
MISTRAL_STYLE_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set rest = messages %}
{%- endif %}
{%- set users = rest | selectattr('role', 'equalto', 'user') | list %}
{{- bos_token }}
{%- for message in rest %}
    {%- if message['role'] == 'user' %}
        {%- if tools and message == users[-1] %}
            {{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if system is defined and message == users[-1] %}
            {{- '[INST]' + system + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined %}
        {{- '[TOOL_CALLS]' + message['tool_calls'] | map(attribute='function') | list | tojson + eos_token }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS]' + {'content': message['content']} | tojson + '[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('only user, assistant and tool turns may follow the system message, got ' + message['role']) }}
    {%- endif %}
{%- endfor %}
"""
FAMILY_TEMPLATES = {"qwen2.5": QWEN25_STYLE_TEMPLATE, "qwen3": QWEN3_STYLE_TEMPLATE, "mistral": MISTRAL_STYLE_TEMPLATE}
TOOLS = [{"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers exactly (à la calculatrice).",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]
TOOL_CALL = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 1497, "b": 63}}}
FAMILY_CHATS = {  # name -> (messages, tools)
    "one_user_turn": ([{"role": "user", "content": "What is 12 * 34?"}], None),
    "system_and_turns": (CONVERSATIONS[1], None),
    "tools_no_system": ([{"role": "user", "content": "1497 * 63, with the tool please"}], TOOLS),
    "tool_call_and_result": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "1497 * 63 in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "94311"},
        {"role": "assistant", "content": "94311"},
        {"role": "user", "content": "Thanks!"}], TOOLS),
    "reasoning": ([
        {"role": "user", "content": "12 * 34?"},
        {"role": "assistant", "content": "<think>\n12 * 34 = 408\n</think>\n\n408"},
        {"role": "user", "content": "And 13 * 3?"}], None),
}


@pytest.mark.parametrize("chat", list(FAMILY_CHATS))
@pytest.mark.parametrize("family", list(FAMILY_TEMPLATES))
def test_family_chat_templates_match_transformers(tiny_dir, family, chat):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg.update(chat_template=FAMILY_TEMPLATES[family], bos_token="<|endoftext|>")
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    messages, tools = FAMILY_CHATS[chat]
    for extra in ({}, {"enable_thinking": False}):
        text = ours.apply_chat_template(messages, tools=tools, **extra)
        assert text == theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                                  **extra)
        want = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                          return_dict=False, **extra)
        assert ours.encode(text, add_special_tokens=False) == want  # the prompt ids the trainer feeds
    if tools:
        assert "Zürich" in text or "à la calculatrice" in text  # tojson keeps non-ASCII text
    if family == "mistral":
        with pytest.raises(Exception, match="got robot"):
            ours.apply_chat_template([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
