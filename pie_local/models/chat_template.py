"""Chat templates: messages -> prompt text, the way the model was fine-tuned to read them.

The template comes from, in order: a models.toml override, the GGUF's `tokenizer.chat_template`,
or a built-in fallback chosen from the vocabulary's special tokens and the architecture (Gemma's
turns, Llama 3 headers, ChatML). GGUF templates are untrusted input: they run in jinja2's
ImmutableSandboxedEnvironment, and every render has a time and output-size budget enforced at each
loop iteration, call, string concatenation and operator, so a hostile template fails with a
ChatTemplateError instead of escaping, hanging or eating memory.

    tmpl = ChatTemplate.for_model(path, arch="gemma3", override=None, tokenizer=tok)
    prompt = tmpl.render([{"role": "user", "content": "Hi"}])   # ends with the model-turn header
    calls = tmpl.parse_tool_calls(generated_text)               # -> [ToolCall(...)]
"""

from __future__ import annotations

import contextvars
import datetime
import json
import os
import re
import time
from dataclasses import dataclass
from functools import update_wrapper
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.filters import do_format
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from pie_local.models.tool_formats import FORMATS, ToolCall, detect_tool_format, parse_tool_calls

__all__ = ["ChatTemplate", "ChatTemplateError", "ToolCall", "parse_tool_calls", "tool_system_prompt"]


class ChatTemplateError(ValueError):
    """The template is invalid, unsafe, too slow or too large, or called raise_exception()."""


# ---- the sandbox --------------------------------------------------------------------------------

_ITER_GUARD = "__pie_iter_guard"
_CONCAT_GUARD = "__pie_concat_guard"


@dataclass
class _Budget:
    """Limits of one render; checked from inside the template's own operations."""

    deadline: float
    max_chars: int
    steps: int = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps & 255 == 0 and time.monotonic() > self.deadline:
            raise ChatTemplateError("chat template took too long to render (time limit exceeded)")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, list, tuple)) and len(value) > self.max_chars:
            raise ChatTemplateError(f"chat template built a value of {len(value)} items/characters "
                                    f"(limit {self.max_chars})")
        return value


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


class _GuardLoopsAndConcat(NodeTransformer):
    """Rewrites the parsed template so `for` loops and `~` go through budget-checking filters
    (the sandbox itself intercepts calls and arithmetic operators, but not these)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _ITER_GUARD, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        joined = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(joined, _CONCAT_GUARD, [], [], None, None, lineno=node.lineno)


def _guard_iter(iterable: Any):
    budget = _budget.get()
    for item in iterable:
        budget.tick()
        yield item


def _guard_concat(parts: list) -> str:
    budget = _budget.get()
    budget.tick()
    if sum(len(p) for p in parts if isinstance(p, str)) > budget.max_chars:
        raise ChatTemplateError(f"chat template built a string longer than {budget.max_chars} characters")
    return "".join(str(p) for p in parts)


# A printf conversion: optional (key), flags, width, .precision, length modifier, conversion char.
_PRINTF_SPEC = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def _check_width(width: Any, limit: int) -> None:
    if isinstance(width, str):
        width = int(width)
    if isinstance(width, int) and abs(width) > limit:
        raise ChatTemplateError(f"chat template formatted a field {abs(width)} characters wide (limit {limit})")


def _check_printf(fmt: str, values: Any, limit: int) -> None:
    """Rejects `fmt % values` whose width or precision (written, or taken from values by `*`)
    exceeds the budget, before Python allocates the padded string."""
    args = values if isinstance(values, tuple) else (values,)
    pos = 0
    for m in _PRINTF_SPEC.finditer(fmt):
        key, width, precision, conversion = m.groups()
        for n in (width, precision):
            if n == "*":
                n, pos = (args[pos] if pos < len(args) else None), pos + 1
            if n is not None:
                _check_width(n, limit)
        if key is None and conversion != "%":
            pos += 1


def _bounded_format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    """jinja's `format` filter (`value % args`) under the same width limit as `%`."""
    _check_printf(str(value), kwargs or args, _budget.get().max_chars)
    return do_format(value, *args, **kwargs)


class _BoundedFields:
    """str.format: every replacement field's spec, after nested fields are filled in, has its
    width and precision checked before the field is padded."""

    def format_field(self, value: Any, format_spec: str) -> str:
        limit = _budget.get().max_chars
        for digits in re.findall(r"\d+", format_spec):
            _check_width(digits, limit)
        return super().format_field(value, format_spec)  # type: ignore[misc]


class _Formatter(_BoundedFields, SandboxedFormatter):
    pass


class _EscapeFormatter(_BoundedFields, SandboxedEscapeFormatter):
    pass


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, > and & (\u003c...), which would corrupt prompts.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with budgets and errors instead of silent Undefined."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        # trim_blocks/lstrip_blocks: what HF transformers uses, so templates render as their authors saw.
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.filters["tojson"] = _tojson
        self.filters["format"] = _bounded_format_filter
        self.filters[_ITER_GUARD] = _guard_iter
        self.filters[_CONCAT_GUARD] = _guard_concat
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"chat template tried to access the unsafe attribute {attribute!r} "
                            f"of a {type(obj).__name__}")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        budget = _budget.get()
        budget.tick()
        return budget.check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget.get()
        budget.tick()
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise ChatTemplateError(f"chat template computed a power with exponent {right} (limit 64)")
        if operator == "*":
            seq, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > budget.max_chars:
                raise ChatTemplateError(f"chat template repeated a value to {len(seq) * count} "
                                        f"items/characters (limit {budget.max_chars})")
        if operator == "%" and isinstance(left, str):
            _check_printf(left, right, budget.max_chars)
        return budget.check_size(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any):
        """Like jinja's (str.format and format_map run through a sandboxed formatter), with
        field widths bounded by the budget."""
        if super().wrap_str_format(value) is None:
            return None
        template: str = value.__self__
        formatter = _EscapeFormatter(self, escape=template.escape) if isinstance(template, Markup) else _Formatter(self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            return type(template)(formatter.vformat(template, args, kwargs))

        return update_wrapper(wrapper, value)


# ---- built-in fallback templates ----------------------------------------------------------------
# Written for pie-local from the published prompt formats. Each handles system/user/assistant/tool
# roles and assistant `tool_calls`; tools themselves are described by `tool_system_prompt()`.

_GEMMA = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] + '\\n\\n' -%}{%- endif -%}
{%- for m in messages -%}
{%- if m['role'] != 'system' -%}
{%- if m['role'] == 'assistant' -%}<start_of_turn>model
{%- else -%}<start_of_turn>user
{%- endif %}

{% if ns.system and m['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif -%}
{%- if m['role'] == 'tool' %}Tool result{% if m.get('name') %} ({{ m['name'] }}){% endif %}: {% endif -%}
{{ m['content'] | trim if m['content'] else '' }}
{%- for call in m.get('tool_calls') or [] -%}
{%- if m['content'] or not loop.first %}{{ '\\n' }}{% endif -%}
{"name": {{ call['function']['name'] | tojson }}, "arguments": {{ call['function']['arguments'] | tojson }}}
{%- endfor -%}
<end_of_turn>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif -%}
"""

_LLAMA3 = """{{ bos_token }}
{%- for m in messages -%}
{%- set role = 'ipython' if m['role'] == 'tool' else m['role'] -%}
<|start_header_id|>{{ role }}<|end_header_id|>

{{ m['content'] | trim if m['content'] else '' }}
{%- for call in m.get('tool_calls') or [] -%}
{"name": {{ call['function']['name'] | tojson }}, "parameters": {{ call['function']['arguments'] | tojson }}}
{%- endfor -%}
<|eot_id|>
{%- endfor -%}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif -%}
"""

_CHATML = """{%- for m in messages -%}
{%- if m['role'] == 'tool' -%}
<|im_start|>user
<tool_response>
{{ m['content'] }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ m['role'] }}
{{ m['content'] if m['content'] else '' }}
{%- for call in m.get('tool_calls') or [] %}

<tool_call>
{"name": {{ call['function']['name'] | tojson }}, "arguments": {{ call['function']['arguments'] | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""

_FALLBACKS = {
    "gemma": (_GEMMA, ["<end_of_turn>"], "json"),
    "llama3": (_LLAMA3, ["<|eot_id|>", "<|eom_id|>"], "llama3"),
    "chatml": (_CHATML, ["<|im_end|>"], "hermes"),
}
# Special tokens that identify a vocabulary's chat format, checked before the architecture name.
_FORMAT_MARKERS = [("<start_of_turn>", "gemma"), ("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml")]
_ARCH_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma", "llama": "llama3",
                 "qwen": "chatml", "qwen2": "chatml", "qwen3": "chatml", "qwen2moe": "chatml", "qwen3moe": "chatml"}
# End-of-turn markers that a template may emit; the ones it contains become stop strings.
_KNOWN_STOPS = ["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
                "<|END_OF_TURN_TOKEN|>", "</s>", "<|end_of_text|>", "<|return|>", "<|call|>"]


def fallback_format(arch: str | None, tokenizer: Any = None) -> str:
    """Which built-in format suits a model without a template: its vocab's markers, else its arch."""
    if tokenizer is not None:
        for marker, fmt in _FORMAT_MARKERS:
            ids = tokenizer.encode(marker, parse_special=True)
            if len(ids) == 1 and tokenizer.is_special(ids[0]):
                return fmt
    fmt = _ARCH_FORMATS.get((arch or "").lower())
    if fmt is None:
        raise ChatTemplateError(f"no chat template in the model and no built-in one for architecture "
                                f"{arch!r}; set chat_template in models.toml")
    return fmt


# ---- the template -------------------------------------------------------------------------------


class ChatTemplate:
    """A compiled, sandboxed chat template with its stop strings and tool-call format."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 stop_strings: list[str] | None = None, tool_format: str | None = None,
                 origin: str = "custom", max_render_seconds: float = 2.0, max_output_chars: int = 1 << 20) -> None:
        self.source = source
        self.origin = origin  # "override", "gguf" or "builtin:<format>"
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_render_seconds = max_render_seconds
        self.max_output_chars = max_output_chars
        self._env = _SandboxEnvironment()
        try:
            tree = self._env.parse(source)
            self.variables = frozenset(meta.find_undeclared_variables(tree))
            self._template = self._env.from_string(_GuardLoopsAndConcat().visit(tree))
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from None
        self.tool_format = tool_format or detect_tool_format(source)
        # Phi-4-mini's template reads the tools (JSON text) from the system message, SmolLM3's from
        # `xml_tools`; the others from `tools`.
        self._tools_in_system = "<|tool|>" in source and "tools" not in self.variables
        self.supports_tools = bool({"tools", "xml_tools"} & self.variables) or self._tools_in_system
        if stop_strings is None:
            stop_strings = [s for s in _KNOWN_STOPS if s in source]
            if self.tool_format == "harmony":  # <|end|> closes a channel (the reasoning), not the turn
                stop_strings = [s for s in stop_strings if s != "<|end|>"]
            if eos_token and eos_token not in stop_strings and eos_token in source:
                stop_strings.append(eos_token)
        self.stop_strings = stop_strings

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def for_model(cls, gguf_path: str | os.PathLike | None = None, arch: str | None = None,
                  override: str | None = None, tokenizer: Any = None) -> ChatTemplate:
        """The template a model should use: models.toml override, else the GGUF's, else built-in.

        Pass the engine's tokenizer to avoid loading the vocabulary a second time.
        """
        if tokenizer is None:
            if gguf_path is None:
                raise ValueError("ChatTemplate.for_model needs gguf_path or tokenizer")
            from pie_local.models.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_gguf(gguf_path)
        arch = arch or tokenizer.architecture
        bos = tokenizer.token_text(tokenizer.bos_id)
        eos = tokenizer.token_text(tokenizer.eos_id)
        if override:
            return cls(override, bos_token=bos, eos_token=eos, origin="override")
        source = tokenizer.chat_template
        if source:
            return cls(source, bos_token=bos, eos_token=eos, origin="gguf")
        return cls.builtin(fallback_format(arch, tokenizer), bos_token=bos, eos_token=eos)

    @classmethod
    def builtin(cls, fmt: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """One of the built-in formats: "gemma", "llama3" or "chatml"."""
        if fmt not in _FALLBACKS:
            raise ChatTemplateError(f"unknown built-in chat format {fmt!r} (known: {', '.join(_FALLBACKS)})")
        source, stops, tool_format = _FALLBACKS[fmt]
        return cls(source, bos_token=bos_token, eos_token=eos_token, stop_strings=list(stops),
                   tool_format=tool_format, origin=f"builtin:{fmt}")

    # ---- rendering ------------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts: role, content, tool_calls, name).

        tools: function descriptions (OpenAI format, or plain {"name", "description", "parameters"}).
        A template that knows `tools` renders them itself; otherwise they are described in the
        system prompt with the instruction to answer in this template's tool-call format.
        The output includes the BOS text when the template writes it: encode it with
        add_special=False, parse_special=True.
        """
        messages = [_check_message(m, i) for i, m in enumerate(messages)]
        tool_list = [_openai_tool(t) for t in tools] if tools else None
        if tool_list and self._tools_in_system:
            messages = _with_system_tools(messages, tool_list)
        elif tool_list and not self.supports_tools:
            messages = _with_system_text(messages, tool_system_prompt(tool_list, self.tool_format))
        variables = dict(extra, messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token, eos_token=self.eos_token,
                         tools=tool_list if "tools" in self.variables else None)
        if "xml_tools" in self.variables:
            variables.setdefault("xml_tools", tool_list)
        budget = _Budget(time.monotonic() + self.max_render_seconds, self.max_output_chars)
        token = _budget.set(budget)
        try:
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise ChatTemplateError(f"chat template output exceeds {self.max_output_chars} characters")
                budget.tick()
                out.append(chunk)
            return "".join(out)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                OverflowError, ZeroDivisionError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        except (RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"chat template exhausted resources: {type(e).__name__}") from None
        finally:
            _budget.reset(token)

    # ---- tool calls -----------------------------------------------------------------------------

    def parse_tool_calls(self, text: str) -> list[ToolCall]:
        return parse_tool_calls(text, self.tool_format)

    @property
    def text_markers(self) -> tuple[str, ...]:
        """Special tokens of this template's tool-call format that generated text must keep."""
        return FORMATS[self.tool_format].markers if self.tool_format in FORMATS else ()

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, stop_strings={self.stop_strings!r})"

    def stop_token_ids(self, tokenizer: Any) -> frozenset[int]:
        """End-of-generation ids of the vocab plus stop strings that are single special tokens."""
        ids = set(tokenizer.eos_ids)
        for s in self.stop_strings:
            encoded = tokenizer.encode(s, parse_special=True)
            if len(encoded) == 1 and tokenizer.is_special(encoded[0]):
                ids.add(encoded[0])
        return frozenset(ids)


def _check_message(message: Any, index: int) -> dict:
    if not isinstance(message, dict) or "role" not in message:
        raise ChatTemplateError(f"message {index} must be a dict with a 'role' (got {message!r:.80})")
    message = dict(message)
    message.setdefault("content", "")
    return message


def _openai_tool(tool: Any) -> dict:
    """{"type": "function", "function": {...}} from a Tool, an OpenAI tool dict or a bare function dict."""
    if hasattr(tool, "to_openai"):
        return tool.to_openai()
    if not isinstance(tool, dict):
        raise ChatTemplateError(f"tools must be dicts or Tool objects, got {type(tool).__name__}")
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        return tool
    if "name" in tool:
        return {"type": "function", "function": tool}
    raise ChatTemplateError(f"tool description has no name: {tool!r:.80}")


def _with_system_text(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}".lstrip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _with_system_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Phi-4-mini style: the functions as JSON text in the system message's `tools` field."""
    text = json.dumps([_openai_tool(t)["function"] for t in tools], ensure_ascii=False)
    if messages and messages[0]["role"] == "system":
        return [dict(messages[0], tools=text), *messages[1:]]
    return [{"role": "system", "content": "", "tools": text}, *messages]


def tool_system_prompt(tools: list[dict], tool_format: str = "json") -> str:
    """A plain-text description of the tools for templates that have no tool support."""
    lines = ["You can call the following tools. To call one, answer with only this, on one line:",
             FORMATS.get(tool_format, FORMATS["json"]).example,
             "", "Tools:"]
    for tool in tools:
        fn = _openai_tool(tool)["function"]
        lines.append(f"- {fn['name']}: {fn.get('description', '').strip()}")
        lines.append(f"  parameters (JSON schema): {json.dumps(fn.get('parameters', {}), ensure_ascii=False)}")
    return "\n".join(lines)
