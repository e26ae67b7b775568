"""Chat templates: built-in formats, GGUF/override precedence, tools, tool-call parsing, hostile templates."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from pie_local.models.chat_template import ChatTemplate, ChatTemplateError, parse_tool_calls
from pie_local.models.tokenizer import Tokenizer
from test_tokenizer import write_vocab_gguf

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]
TOOL_TURNS = [
    {"role": "user", "content": "Add 1 and 2"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
    {"role": "tool", "name": "add", "content": "3"},
]
ADD_TOOL = {"name": "add", "description": "Add two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"]}}


@pytest.fixture(scope="module")
def tok(starter_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(starter_gguf)


def test_starter_model_gets_gemma_format(tok: Tokenizer) -> None:
    tmpl = ChatTemplate.for_model(tokenizer=tok)
    assert tmpl.origin == "builtin:gemma"
    assert tmpl.render(CHAT) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert tmpl.render(CHAT, add_generation_prompt=False).endswith("2+2?<end_of_turn>\n")
    assert tmpl.stop_strings == ["<end_of_turn>"]
    assert tmpl.stop_token_ids(tok) == frozenset({1, 106, 212})
    # The rendered text tokenizes with the turn markers as control tokens.
    ids = tok.encode(tmpl.render(CHAT[1:2]))
    assert ids[:2] == [2, 105] and ids.count(106) == 1 and ids[-3:-1] == [105, tok.encode("model")[0]]


def test_for_model_reads_the_path(starter_gguf: Path) -> None:
    assert ChatTemplate.for_model(starter_gguf, "gemma3").origin == "builtin:gemma"


def test_builtin_llama3_and_chatml() -> None:
    llama3 = ChatTemplate.builtin("llama3", bos_token="<|begin_of_text|>")
    assert llama3.render(CHAT[1:2]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.stop_strings == ["<|eot_id|>", "<|eom_id|>"]
    chatml = ChatTemplate.builtin("chatml")
    assert chatml.render(CHAT[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert chatml.render(TOOL_TURNS, add_generation_prompt=False) == (
        "<|im_start|>user\nAdd 1 and 2<|im_end|>\n"
        "<|im_start|>assistant\n\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n")
    with pytest.raises(ChatTemplateError, match="unknown built-in"):
        ChatTemplate.builtin("vicuna")


def test_fallback_by_architecture_without_vocab_markers(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "v.gguf"))
    assert ChatTemplate.for_model(tokenizer=tok, arch="qwen2").origin == "builtin:chatml"
    assert ChatTemplate.for_model(tokenizer=tok).origin == "builtin:llama3"  # general.architecture = llama
    with pytest.raises(ChatTemplateError, match="models.toml"):
        ChatTemplate.for_model(tokenizer=tok, arch="mamba")


def test_gguf_template_and_override_precedence(tmp_path: Path) -> None:
    source = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}</s>{% endfor %}"
    tok = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "v.gguf", chat_template=source))
    from_file = ChatTemplate.for_model(tokenizer=tok)
    assert from_file.origin == "gguf"
    assert from_file.render(CHAT[1:3]) == "<s>[user] Hi</s>[assistant] Hello!</s>"
    assert from_file.stop_strings == ["</s>"]
    override = ChatTemplate.for_model(tokenizer=tok, override="{% for m in messages %}{{ m.content }};{% endfor %}")
    assert override.origin == "override"
    assert override.render(CHAT[1:3]) == "Hi;Hello!;"


def test_tools_in_system_prompt_when_template_has_no_tool_support() -> None:
    tmpl = ChatTemplate.builtin("gemma", bos_token="<bos>")
    assert not tmpl.supports_tools
    text = tmpl.render(CHAT[:2], tools=[ADD_TOOL])
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nYou can call the following tools.")
    assert '{"name": "TOOL_NAME", "arguments": {...}}' in text
    assert "- add: Add two integers." in text
    assert json.dumps(ADD_TOOL["parameters"]) in text
    assert text.endswith("Hi<end_of_turn>\n<start_of_turn>model\n")
    hermes = ChatTemplate.builtin("chatml").render(CHAT[1:2], tools=[ADD_TOOL])
    assert hermes.startswith("<|im_start|>system\nYou can call") and "<tool_call>" in hermes


def test_tools_passed_to_a_template_that_knows_them() -> None:
    source = ("{% if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n"
              "{{ tools[0] | tojson }}\n{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    tmpl = ChatTemplate(source)
    assert tmpl.supports_tools
    out = tmpl.render([{"role": "user", "content": "<hi> & bye"}], tools=[ADD_TOOL])
    first, second, third = out.split("\n")
    assert first == "TOOLS=add"
    assert json.loads(second) == {"type": "function", "function": ADD_TOOL}
    assert third == "<hi> & bye"  # tojson and the output are not HTML-escaped


def test_gemma_renders_tool_calls_and_results() -> None:
    out = ChatTemplate.builtin("gemma", bos_token="<bos>").render(TOOL_TURNS)
    assert out == ("<bos><start_of_turn>user\nAdd 1 and 2<end_of_turn>\n"
                   "<start_of_turn>model\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}<end_of_turn>\n"
                   "<start_of_turn>user\nTool result (add): 3<end_of_turn>\n<start_of_turn>model\n")
    # What the model wrote parses back into the same call.
    [call] = parse_tool_calls(out.split("model\n")[1])
    assert (call.name, call.arguments) == ("add", {"a": 1, "b": 2})
    assert call.to_message()["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}


def test_template_globals() -> None:
    tmpl = ChatTemplate("{{ strftime_now('%Y') }}|{{ add_generation_prompt }}|{{ eos_token }}", eos_token="<e>")
    year, gen, eos = tmpl.render([], add_generation_prompt=False).split("|")
    assert len(year) == 4 and year.isdigit() and gen == "False" and eos == "<e>"
    refuse = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert refuse.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="refused the conversation: first must be user"):
        refuse.render(CHAT)
    with pytest.raises(ChatTemplateError, match="must be a dict with a 'role'"):
        refuse.render(["hello"])


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', [("add", {"a": 1})]),
    ('Sure.<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": [1]}}'
     '</tool_call>', [("a", {}), ("b", {"x": [1]})]),
    ('<tool_call>{"name": "cut", "arguments": {"s": "unterminated block"}}', [("cut", {"s": "unterminated block"})]),
    ('<|python_tag|>{"name": "search", "parameters": {"q": "cats"}}', [("search", {"q": "cats"})]),
    ('I will call it: {"name": "f", "arguments": "{\\"n\\": 2}"} done', [("f", {"n": 2})]),
    ('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"k": true}}]', [("f", {}), ("g", {"k": True})]),
    ('{"type": "function", "function": {"name": "h", "arguments": {"z": null}}}', [("h", {"z": None})]),
    ('no call here {"not": "a call"} {broken json', []),
    ('{"name": "", "arguments": {}} {"name": "x", "arguments": [1]}', []),
])
def test_parse_tool_calls(text: str, expected: list[tuple[str, dict]]) -> None:
    assert [(c.name, c.arguments) for c in parse_tool_calls(text)] == expected


HOSTILE = {
    "class walk": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe attribute '__class__'"),
    "globals": ("{{ raise_exception.__globals__ }}", "unsafe attribute '__globals__'"),
    "mutation": ("{{ messages.append(1) }}", "unsafe attribute 'append'"),
    "nested ranges": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                      "took too long"),
    "nested lists": ("{% set x = range(100000) | list %}{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}",
                     "took too long"),
    "huge output": ("{% for a in range(100000) %}{% for b in range(1000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
                    "output exceeds"),
    "string repeat": ("{{ 'x' * 10000000000 }}", "repeated a value"),
    "list repeat": ("{{ (range(1000) | list) * 100000 }}", "repeated a value"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s | length }}", "longer than"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}", "built a value"),
    "big power": ("{{ 2 ** 100000000 }}", "exponent"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "huge range": ("{{ range(10 ** 9) | list | length }}", "Range too big"),
    "%-format width": ("{{ '%0999999999d' % 1 }}", "field 999999999 characters wide"),
    "%-format precision": ("{{ '%.999999999f' % 1.5 }}", "field 999999999 characters wide"),
    "%-format width from *": ("{{ '%-5s%*d' % ('a', -999999999, 1) }}", "field 999999999 characters wide"),
    "%-format by key": ("{{ '%(a)0999999999d' % {'a': 1} }}", "field 999999999 characters wide"),
    "format filter": ("{{ '%0999999999d' | format(1) }}", "field 999999999 characters wide"),
    "str.format width": ("{{ '{:0999999999}'.format(1) }}", "field 999999999 characters wide"),
    "str.format nested width": ("{{ '{:{w}}'.format(1, w=999999999) }}", "field 999999999 characters wide"),
    "format_map width": ("{{ '{x:>999999999}'.format_map({'x': 1}) }}", "field 999999999 characters wide"),
    "str.format escape": ("{{ '{0.__class__}'.format(1) }}", "unsafe attribute '__class__'"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_fail_cleanly(name: str) -> None:
    source, message = HOSTILE[name]
    tmpl = ChatTemplate(source, max_render_seconds=0.5)
    with pytest.raises(ChatTemplateError, match=message):
        tmpl.render(CHAT)


def test_wide_format_is_rejected_before_allocating() -> None:
    # Without the check Python builds the 1 GB string first and the size budget rejects it after.
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match="wide"):
            ChatTemplate("{{ '%0999999999d' % 1 }}").render(CHAT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20


def test_ordinary_formatting_still_works() -> None:
    source = ("{{ '%05d|%-4s|%.2f|%%|%*d' % (42, 'ab', 3.14159, 3, 7) }};{{ '%(n)s=%(v)03d' % {'n': 'x', 'v': 5} }};"
              "{{ '%s-%s' | format('a', 'b') }};{{ '{:>5}|{:.3f}|{n:_^7}'.format('ab', 2.5, n='z') }};"
              "{{ '{0[role]}'.format(messages[0]) }};{{ '{a}'.format_map({'a': 1}) }};{{ '{:{w}}'.format(1, w=4) }}")
    assert ChatTemplate(source).render(CHAT) == "00042|ab  |3.14|%|  7;x=005;a-b;   ab|2.500|___z___;system;1;   1"
    limit = ChatTemplate("{{ '%0100d' % 1 }}", max_output_chars=100)
    with pytest.raises(ChatTemplateError, match="field 100 characters wide"):
        ChatTemplate("{{ '%0100d' % 1 }}", max_output_chars=99).render(CHAT)
    assert limit.render(CHAT) == "0" * 99 + "1"


def test_template_syntax_error() -> None:
    with pytest.raises(ChatTemplateError, match=r"does not parse \(line 2\)"):
        ChatTemplate("ok\n{% for %}")


def test_budget_does_not_leak_between_renders() -> None:
    tmpl = ChatTemplate("{% for m in messages %}{{ m.content ~ '.' }}{% endfor %}", max_output_chars=100)
    with pytest.raises(ChatTemplateError):
        tmpl.render([{"role": "user", "content": "x" * 200}])
    assert tmpl.render([{"role": "user", "content": "x" * 10}]) == "x" * 10 + "."
