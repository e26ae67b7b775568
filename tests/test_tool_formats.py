"""Tool-call formats of each model family: found in the chat template, tools rendered where the
family's template puts them, calls parsed back (several, cut off, malformed), and a call forced in
the format, on the starter model's vocabulary and on a vocabulary whose markers are special tokens.

The templates below are short ones in the style of each family's real template (same markers,
same variables, same way of writing tools and calls), not copies of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pie_local.models.chat_template import ChatTemplate, ChatTemplateError
from pie_local.models.tokenizer import Tokenizer
from pie_local.models.tool_formats import CALL_STARTS, FORMATS, ToolCall, detect_tool_format, parse_tool_calls
from pie_local.runtime.constraints import allowed_tokens
from pie_local.runtime.tools import Tool, as_tools, call_tool, tool_call_constraint
from pie_local.server.tool_calls import CallSniffer, extract_calls
from test_constraints import random_generate

# ---- family templates ----------------------------------------------------------------------------

MINISTRAL = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + messages[0]['content'] + '[/SYSTEM_PROMPT]' }}
{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- if tools %}{{- '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}
{%- elif message['role'] == 'assistant' %}{{- message['content'] }}
{%- for tool in message.get('tool_calls') or [] %}
{%- set arguments = tool['function']['arguments'] %}{%- if arguments is not string %}{%- set arguments = arguments|tojson %}{%- endif %}
{{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}
{%- endfor %}{{- eos_token }}
{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS]' + message['content'] + '[/TOOL_RESULTS]' }}
{%- endif %}{%- endfor %}"""

NEMO = """{{- bos_token }}
{%- for message in messages %}
{%- if message['role'] == 'user' %}
{%- if tools and loop.last %}{{- '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{{- '[INST]' + message['content'] + '[/INST]' }}
{%- elif message.tool_calls %}{{- '[TOOL_CALLS][' }}
{%- for tool_call in message.tool_calls %}{%- set out = tool_call.function|tojson %}{{- out[:-1] }}
{%- if tool_call.id|length != 9 %}{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}
{{- ', "id": "' + tool_call.id + '"}' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}
{%- endfor %}{{- ']' + eos_token }}
{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}
{%- elif message['role'] == 'tool' %}
{%- if message.tool_call_id|length != 9 %}{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}
{{- '[TOOL_RESULTS]{"content": ' + message['content']|string + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
{%- endif %}{%- endfor %}"""

PHI4_MINI = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
             "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
             "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
             "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

GRANITE3 = """{%- if tools and not available_tools %}{%- set available_tools = tools %}{%- endif %}
{{- '<|start_of_role|>system<|end_of_role|>' }}
{%- if available_tools %}{{- "You are a helpful assistant with access to the following tools. When a tool is required to answer the user's query, respond only with <|tool_call|> followed by a JSON list of tools used." }}
{%- else %}{{- 'You are Granite, developed by IBM.' }}{%- endif %}{{- '<|end_of_text|>\n' }}
{%- if available_tools %}{{- '<|start_of_role|>available_tools<|end_of_role|>' + available_tools|tojson(indent=4) + '<|end_of_text|>\n' }}{%- endif %}
{%- for message in messages %}{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"""

SMOLLM3 = """{{- '<|im_start|>system\n## Metadata\n\nReasoning Mode: /no_think\n\n' }}
{%- if xml_tools %}{{- '### Tools\n\nYou may call one or more functions to assist with the user query.\nYou are provided with function signatures within <tools></tools> XML tags:\n\n<tools>\n' }}
{%- for tool in xml_tools[:] %}{{- (tool | string) + '\n' }}{%- endfor %}
{{- '</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
{%- endif %}{{- '<|im_end|>\n' }}
{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n' }}{%- endif %}"""

QWEN3 = """{%- if tools %}{{- '<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}{{- '\n' + tool|tojson }}{%- endfor %}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\n' + message.content }}
{%- for tool_call in message.tool_calls or [] %}{%- set tc = tool_call.function if tool_call.function else tool_call %}
{{- '\n<tool_call>\n{"name": "' + tc.name + '", "arguments": ' + tc.arguments|tojson + '}\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

GPT_OSS = """{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nReasoning: low\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.' }}
{%- if tools %}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." }}{%- endif %}{{- '<|end|>' }}
{%- if tools %}{{- '<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n' }}
{%- for tool in tools %}{%- set fn = tool.function %}{{- '// ' + fn.description + '\ntype ' + fn.name + ' = (_: ' + fn.parameters|tojson + ') => any;\n\n' }}{%- endfor %}
{{- '} // namespace functions<|end|>' }}{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}{%- set tc = message.tool_calls[0].function %}
{{- '<|start|>assistant to=functions.' + tc.name + '<|channel|>commentary json<|message|>' + tc.arguments|tojson + '<|call|>' }}
{%- elif message.role == 'assistant' %}{{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}
{%- elif message.role == 'tool' %}{{- '<|start|>functions.' + message.name + ' to=assistant<|channel|>commentary<|message|>' + message.content|tojson + '<|end|>' }}
{%- else %}{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"""

FAMILIES = {"mistral": MINISTRAL, "mistral-json": NEMO, "phi4": PHI4_MINI, "granite": GRANITE3,
            "smollm3": SMOLLM3, "qwen3": QWEN3, "harmony": GPT_OSS}
EXPECTED_FORMAT = {"mistral": "mistral", "mistral-json": "mistral-json", "phi4": "phi4", "granite": "granite",
                   "smollm3": "hermes", "qwen3": "hermes", "harmony": "harmony"}


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def get_weather(city: str, unit: str = "C") -> str:
    return f"sunny in {city}, 21 {unit}"


# Bounded values: a random walk ends a free string only when it draws a '"' token, and a greedy
# base model may write digits for ever.
NUMBER = {"type": "integer", "minimum": -999, "maximum": 999}
ADD = Tool("add", "Add two integers.", {"type": "object", "properties": {"a": NUMBER, "b": NUMBER},
                                        "required": ["a", "b"], "additionalProperties": False}, add)
WEATHER = Tool("get_weather", "The weather in a city.", {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city"], "additionalProperties": False}, get_weather)
TOOLS = [ADD, WEATHER]
ASK = [{"role": "user", "content": "What is 2 + 3?"}]


def template(family: str) -> ChatTemplate:
    return ChatTemplate(FAMILIES[family], bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_template_names_its_format(family: str) -> None:
    tmpl = template(family)
    assert tmpl.tool_format == EXPECTED_FORMAT[family] == detect_tool_format(FAMILIES[family])
    assert tmpl.supports_tools  # every one of these renders tools itself


def test_tools_are_rendered_where_each_family_puts_them() -> None:
    functions = [t.schema for t in TOOLS]
    mistral = template("mistral").render(ASK, tools=TOOLS)
    listed = mistral.split("[AVAILABLE_TOOLS]")[1].split("[/AVAILABLE_TOOLS]")[0]
    assert [t["function"] for t in json.loads(listed)] == functions and mistral.endswith("[INST]What is 2 + 3?[/INST]")

    phi = template("phi4").render(ASK, tools=TOOLS)  # Phi-4-mini: JSON text in the system message's `tools`
    assert phi.startswith("<|system|><|tool|>") and phi.endswith("<|end|><|user|>What is 2 + 3?<|end|><|assistant|>")
    assert json.loads(phi.split("<|tool|>")[1].split("<|/tool|>")[0]) == functions
    with_system = template("phi4").render([{"role": "system", "content": "Be brief."}, *ASK], tools=TOOLS)
    assert with_system.startswith("<|system|>Be brief.<|tool|>[")

    granite = template("granite").render(ASK, tools=TOOLS)  # `tools` aliased to `available_tools`
    assert "respond only with <|tool_call|>" in granite
    table = granite.split("<|start_of_role|>available_tools<|end_of_role|>")[1].split("<|end_of_text|>")[0]
    assert [t["function"] for t in json.loads(table)] == functions and '\n    {\n        "type"' in table

    smol = template("smollm3").render(ASK, tools=TOOLS)  # SmolLM3 reads them from `xml_tools`
    assert "<tools>\n{'type': 'function', 'function': {'name': 'add'" in smol and "<tool_call>\n{\"name\"" in smol

    qwen = template("qwen3").render(ASK, tools=TOOLS)
    assert '\n{"type": "function", "function": {"name": "get_weather"' in qwen

    oss = template("harmony").render(ASK, tools=TOOLS)
    assert "// Add two integers.\ntype add = (_: {" in oss and oss.endswith("<|start|>user<|message|>What is 2 + 3?<|end|><|start|>assistant")
    assert template("harmony").stop_strings == ["<|call|>"]  # <|end|> closes the reasoning, not the turn
    assert "<|end|>" in template("phi4").stop_strings


@pytest.mark.parametrize("family", ["mistral", "mistral-json", "qwen3", "harmony"])
def test_what_a_template_writes_for_a_call_parses_back(family: str) -> None:
    """A call written into the history by the family's template, cut out of the prompt, parses to
    the same call; the parsed call's id is one the template accepts (Mistral's: 9 characters)."""
    tmpl = template(family)
    before = tmpl.render(ASK, add_generation_prompt=True)
    [written] = parse_tool_calls('{"name": "add", "arguments": {"a": 2, "b": 3}}', tmpl.tool_format)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [written.to_message()]},
               {"role": "tool", "name": "add", "tool_call_id": written.id, "content": "5"}]
    full = tmpl.render(history, add_generation_prompt=False)
    prefix = before.removesuffix("<|start|>assistant")  # harmony's generation prompt opens the message
    assert full.startswith(prefix)
    call_text = full[len(prefix):]
    [call] = tmpl.parse_tool_calls(call_text)
    assert (call.name, call.arguments) == ("add", {"a": 2, "b": 3})
    if FORMATS[tmpl.tool_format].short_ids:
        assert len(call.id) == 9 and call.id.isalnum()
        tmpl.render([*ASK, {"role": "assistant", "content": "", "tool_calls": [call.to_message()]}])


def test_mistral_history_refuses_long_ids_so_parsed_calls_get_short_ones() -> None:
    long_id = {"id": "call_0123456789ab", "type": "function", "function": {"name": "add", "arguments": {}}}
    with pytest.raises(ChatTemplateError, match="length 9"):
        template("mistral-json").render([*ASK, {"role": "assistant", "content": "", "tool_calls": [long_id]}])
    for text in ('[TOOL_CALLS][{"name": "add", "arguments": {}, "id": "call_0123456789ab"}]',
                 '[TOOL_CALLS]add[ARGS]{}'):
        [call] = parse_tool_calls(text)
        assert len(call.id) == 9 and call.id.isalnum()


# ---- parsing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # Mistral, newer: one marker per call, the name outside the JSON, maybe a call id
    ('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', [("add", {"a": 1, "b": 2})]),
    ('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}',
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ('[TOOL_CALLS]add[CALL_ID]a1B2c3D4e[ARGS]{"a": 0, "b": 0}', [("add", {"a": 0, "b": 0})]),
    # Mistral, older: a JSON list after the marker (with or without a space)
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": '
     '{"city": "Oslo"}}]', [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 5, "b": 6}, "id": "abcdefghi"}]', [("add", {"a": 5, "b": 6})]),
    # Phi-4-mini and Granite 3.x
    ('<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}]<|/tool_call|>', [("add", {"a": 1, "b": 2})]),
    ('<|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": '
     '{"city": "Rome"}}]', [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]),
    # gpt-oss harmony: after the reasoning; the recipient in the channel or in the role header
    ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary '
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}', [("get_weather", {"city": "Paris"})]),
    ('<|start|>assistant to=functions.add<|channel|>commentary json<|message|>{"a": 1, "b": 2}<|call|>',
     [("add", {"a": 1, "b": 2})]),
    # hermes (Qwen3, SmolLM3)
    ('<think>\n\n</think>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>',
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Lima"})]),
    # malformed: no call, and no exception
    ('[TOOL_CALLS]add[ARGS]{"a": 1, "b"', []),
    ('[TOOL_CALLS]add[ARGS][1, 2]', []),
    ('[TOOL_CALLS][{"name": 3, "arguments": {}}]', []),
    ('<|tool_call|>[{"name": "add", "arguments": "not json"}]<|/tool_call|>', []),
    ('<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1,', []),
    ('<|channel|>commentary to=functions. json<|message|>{}', []),
    ('[ARGS]{"a": 1}', []),
    ('<|tool_call|><|/tool_call|>', []),
])
def test_parse_each_format(text: str, expected: list) -> None:
    assert [(c.name, c.arguments) for c in parse_tool_calls(text)] == expected


CALLS = ['[TOOL_CALLS]get_weather[CALL_ID]abcdefghi[ARGS]{"city": "Paris", "unit": "C"}[TOOL_CALLS]add[ARGS]{"a": 1}',
         '[TOOL_CALLS][{"name": "add", "arguments": {"a": [1, {"b": "}"}]}}]',
         '<|tool_call|>[{"name": "add", "arguments": {"a": 1}}]<|/tool_call|>',
         '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": "x\\"y"}<|call|>',
         '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>']


@pytest.mark.parametrize("text", CALLS)
def test_cut_off_or_damaged_calls_never_raise(text: str) -> None:
    """Every prefix (a generation stopped anywhere) and every one-character deletion parses to
    whole calls or none: never an exception, never a call without a name or with non-object arguments."""
    variants = [text[:i] for i in range(len(text) + 1)] + [text[:i] + text[i + 1:] for i in range(len(text))]
    for variant in variants + ["[" * 5000 + text, text.replace("{", "[" * 3000, 1)]:
        for call in parse_tool_calls(variant):
            assert call.name and isinstance(call.arguments, dict), variant
    assert parse_tool_calls(text)  # the whole text is a call


def test_server_finds_calls_in_streamed_text_of_every_format() -> None:
    """Streaming in "auto" mode holds back output that starts like a call in any format, then the
    calls are parsed from it; prose streams at once."""
    for text in CALLS:
        sniffer = CallSniffer()
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
        assert all(sniffer.push(piece) == "" for piece in pieces), text
        assert sniffer.state == "call"
        tools = [type("Spec", (), {"name": n})() for n in ("add", "get_weather")]
        assert extract_calls(sniffer.held, tools), text
    prose = CallSniffer()
    assert prose.push("The answer") == "The answer" and prose.state == "text"
    assert all(s in CALL_STARTS for s in ("[TOOL_CALLS]", "<|tool_call|>", "<|channel|>", "<tool_call>"))


# ---- forcing a call ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(starter_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(starter_gguf)


FIRST = {"mistral": "[TOOL_CALLS]", "mistral-json": "[TOOL_CALLS][", "phi4": "<|tool_call|>[",
         "granite": "<|tool_call|>[", "harmony": "<|channel|>commentary to=functions.", "hermes": "<tool_call>\n"}


@pytest.mark.parametrize("tool_format", sorted(FIRST))
@pytest.mark.parametrize("seed", range(3))
async def test_forced_call_in_each_format_parses_and_runs(tok: Tokenizer, tool_format: str, seed: int) -> None:
    """A uniformly random 'model' under the constraint still writes one call that parses back to a
    real tool with arguments its function accepts (the starter vocab has none of the markers as
    special tokens: they are written as text)."""
    state = tool_call_constraint(TOOLS, tool_format).bind(tok)
    text = random_generate(state, tok, np.random.default_rng(seed), max_tokens=400)
    assert text.startswith(FIRST[tool_format]), text
    if tool_format == "phi4":
        assert text.endswith("]<|/tool_call|>")
    [call] = parse_tool_calls(text, tool_format)
    result = await call_tool(TOOLS, call)
    assert result.ok, (text, result.text)


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown tool-call format 'xml'.*mistral"):
        tool_call_constraint(TOOLS, "xml")


MARKERS = ["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|tool_call|>", "<|/tool_call|>", "<|channel|>",
           "<|constrain|>", "<|message|>"]


@pytest.fixture(scope="module")
def marker_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentencePiece vocabulary whose last pieces are replaced by the formats' markers as
    control tokens, as Mistral's, Phi-4's and gpt-oss's vocabularies have them."""
    import gguf
    from tiny_models import write_tiny_gguf

    def with_markers(vocab) -> None:
        for i, marker in enumerate(MARKERS, start=len(vocab.tokens) - len(MARKERS)):
            vocab.tokens[i], vocab.types[i] = marker, int(gguf.TokenType.CONTROL)

    return write_tiny_gguf(tmp_path_factory.mktemp("markers") / "markers.gguf", "llama", vocab_hook=with_markers)


@pytest.mark.parametrize("tool_format", ["mistral", "phi4", "harmony"])
async def test_markers_are_written_as_the_vocabs_special_tokens(marker_vocab: Path, tool_format: str) -> None:
    """Where the vocab has a marker as a special token the forced call uses that token (the model's
    own), and the engine keeps it in the generated text, where the parser needs it."""
    tok = Tokenizer.from_gguf(marker_vocab)  # its own: keep_in_text changes it
    ids = {m: tok.special_token(m) for m in FORMATS[tool_format].markers if tok.special_token(m) is not None}
    control = {m for m, t in ids.items() if tok.is_special(t)}
    # llama.cpp itself makes gpt-oss's <|channel|>, <|message|>, <|constrain|> user-defined tokens,
    # which text shows; the others stay control tokens, which text leaves out
    assert ids and control == (set() if tool_format == "harmony" else set(ids))
    assert tok.special_token("add") is None and tok.special_token("<|end|>") is None  # text, or absent
    adder = as_tools([add])  # integer arguments: a random walk ends them soon (strings end at one '"' token)
    state = tool_call_constraint(adder, tool_format).bind(tok)
    rng = np.random.default_rng(7)
    out: list[int] = []
    while not state.is_done():
        assert len(out) < 2000, tok.decode(out)
        token = int(rng.choice(allowed_tokens(state.mask())))
        state.advance(token)
        if token not in tok.eos_ids:
            out.append(token)
    used = set(out) & set(ids.values())
    assert used, f"no marker token in {out}"
    hidden = tok.decode(out, special=False)
    assert not any(m in hidden for m in control)  # control tokens leave generated text ...
    tok.keep_in_text(FORMATS[tool_format].markers)
    shown = tok.decode(out, special=False)  # ... unless kept, as the engine keeps its template's
    assert shown == b"".join(tok.piece(t, special=False) for t in out).decode()
    assert all(m in shown for m in ids if ids[m] in used)
    [call] = parse_tool_calls(shown, tool_format)
    assert (await call_tool(adder, call)).ok, shown


@pytest.mark.real_driver
@pytest.mark.parametrize("family", ["mistral", "phi4"])
async def test_engine_keeps_its_templates_markers_in_generated_text(marker_vocab: Path, family: str) -> None:
    """A tiny model whose vocab has the markers as control tokens, under the family's template: the
    forced call is written with the marker tokens and the generated text shows them, so the
    template's parser finds the call (without them Mistral's text would read `add{...}`)."""
    from pie_local.driver.types import DriverParams
    from pie_local.runtime.engine import Engine, EngineConfig
    from pie_local.runtime.sampling import SamplingParams

    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:
        pytest.skip("the native driver is not built")
    adder = as_tools([add])
    config = EngineConfig(driver=DriverParams(n_threads=2, n_pages=32), chat_template=FAMILIES[family])
    async with Engine(str(marker_vocab), config) as engine:
        markers = {engine.tokenizer.special_token(m) for m in engine.chat_template.text_markers} - {None}
        async with engine.context() as ctx:
            ctx.fill(engine.chat_template.render([{"role": "user", "content": "add"}], tools=adder))
            text = await ctx.generate(SamplingParams(seed=3, temperature=1.0), max_tokens=200,
                                      constrain=tool_call_constraint(adder, engine.chat_template.tool_format))
        assert markers & set(text.token_ids), text
        assert text.startswith(FIRST[EXPECTED_FORMAT[family]]), text
        [call] = engine.chat_template.parse_tool_calls(text)
        assert (await call_tool(adder, call)).ok, text


# ---- the starter model, end to end ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real_driver
async def test_starter_model_writes_a_call_in_each_family_format(starter_gguf: Path) -> None:
    """Each family's template renders the tools, the starter model (a base model that knows none of
    these formats) writes a call under the format's constraint, the template's parser reads it."""
    from pie_local.driver.types import DriverParams
    from pie_local.runtime.engine import Engine, EngineConfig
    from pie_local.runtime.sampling import SamplingParams

    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:
        pytest.skip("the native driver is not built")
    async with Engine(str(starter_gguf), EngineConfig(driver=DriverParams(n_threads=2, n_pages=64))) as engine:
        for family in FAMILIES:
            tmpl = ChatTemplate(FAMILIES[family], bos_token="<bos>", eos_token="<eos>")
            async with engine.context() as ctx:
                ctx.fill(tmpl.render([{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS))
                text = await ctx.generate(SamplingParams(), max_tokens=64,
                                          constrain=tool_call_constraint(TOOLS, tmpl.tool_format))
            assert text.finish_reason == "stop", (family, text)
            [call] = tmpl.parse_tool_calls(text)
            result = await call_tool(TOOLS, call)
            assert result.ok, (family, text, result.text)


@pytest.mark.slow
@pytest.mark.real_driver
@pytest.mark.parametrize("family", ["mistral", "phi4", "harmony"])
async def test_server_returns_and_streams_a_forced_call_in_the_family_format(starter_gguf: Path, family: str) -> None:
    """/v1/chat/completions on the starter model under a family's template: the forced call comes
    back as `tool_calls` (not as text with markers), streamed or not, the same greedy call."""
    import httpx
    from server_helpers import serving

    from pie_local.driver.types import DriverParams
    from pie_local.runtime.engine import Engine, EngineConfig
    from pie_local.server.config import ServerConfig
    from pie_local.server.manager import ModelManager

    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:
        pytest.skip("the native driver is not built")
    engine_config = EngineConfig(driver=DriverParams(n_threads=2, n_pages=128), chat_template=FAMILIES[family])
    config = ServerConfig()
    manager = ModelManager(config, resolve=lambda name: "starter",
                           make_engine=lambda name: Engine(str(starter_gguf), engine_config))
    body = {"model": "starter", "messages": [{"role": "user", "content": "Add 2 and 3."}], "max_tokens": 64,
            "temperature": 0, "tools": [t.to_openai() for t in TOOLS], "tool_choice": "required"}
    async with serving(config, manager) as url, httpx.AsyncClient(base_url=url, timeout=300) as client:
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
        [call] = choice["message"]["tool_calls"]
        arguments = json.loads(call["function"]["arguments"])
        assert (await call_tool(TOOLS, ToolCall(call["function"]["name"], arguments))).ok
        if FORMATS[EXPECTED_FORMAT[family]].short_ids:
            assert len(call["id"]) == 9

        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        deltas = [e["choices"][0] for e in events if e["choices"]]
        assert deltas[-1]["finish_reason"] == "tool_calls"
        assert not any(d["delta"].get("content") for d in deltas)  # the markers never reach the client as text
        [part] = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
        assert part["function"]["name"] == call["function"]["name"]
        assert json.loads(part["function"]["arguments"]) == arguments  # greedy: the same call


def test_tool_objects_and_openai_dicts_render_the_same() -> None:
    as_dicts = [t.to_openai() for t in TOOLS]
    for family in FAMILIES:
        assert template(family).render(ASK, tools=TOOLS) == template(family).render(ASK, tools=as_dicts), family
    assert isinstance(TOOLS[0], Tool)
