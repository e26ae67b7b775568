"""OpenAI request bodies -> checked dataclasses, with a 400 naming the parameter for anything wrong.

Only what a request *says* is checked here; what depends on the model (prompt length against the
context, the tool-call format) is checked where the engine is known.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pie_local.server.errors import APIError, invalid

MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ROLES = {"system", "developer", "user", "assistant", "tool"}


async def read_json(request: Any) -> dict:
    """The body as a JSON object, or 400 invalid_json."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# ---- typed fields ----------------------------------------------------------------------------------


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(key, f"expected a number, got {json.dumps(value)}", "invalid_type")
    if value > hi or value < lo or (lo_open and value == lo):
        raise invalid(key, f"{value} is out of range ({'(' if lo_open else '['}{lo:g}, {hi:g}])")
    return float(value)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"expected an integer, got {json.dumps(value)}", "invalid_type")
    if value < lo or (hi is not None and value > hi):
        raise invalid(key, f"{value} is out of range [{lo}, {'∞' if hi is None else hi}]")
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(key, f"expected true or false, got {json.dumps(value)}", "invalid_type")
    return value


def _unsupported_unless_default(body: dict, key: str, default: Any) -> None:
    value = body.get(key)
    if value is not None and value != default:
        raise invalid(key, f"not supported by this server (only {json.dumps(default)})", "unsupported_parameter")


# ---- shared sampling parameters ---------------------------------------------------------------------


@dataclass
class GenerationRequest:
    model: str
    max_tokens: int | None  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def _generation_fields(body: dict, max_n: int) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model", "required: a model name (GET /v1/models lists them)", "missing_model")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop", "expected a string or a list of strings", "invalid_type")
    if len(stop) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options", "expected an object", "invalid_type")
        if not stream:
            raise invalid("stream_options", "only allowed when stream is true")
    include_usage = _bool(options or {}, "include_usage")
    for key in ("presence_penalty", "frequency_penalty"):
        _unsupported_unless_default(body, key, 0)
    if body.get("logit_bias"):
        raise invalid("logit_bias", "not supported by this server", "unsupported_parameter")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid("seed", f"expected an integer, got {json.dumps(seed)}", "invalid_type")
    return dict(
        model=model.strip(), max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, 0),  # llama.cpp's extensions, for clients that send them
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=None if seed is None else seed & 0xFFFFFFFFFFFFFFFF,
        stop=[s for s in stop if s], n=_int(body, "n", 1, 1, max_n), stream=stream, include_usage=include_usage,
    )


# ---- /v1/chat/completions ---------------------------------------------------------------------------


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict

    def to_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict] = field(default_factory=list)
    response_format: Any = None  # a pie_local.runtime.constraints.Constraint, or None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: str = "auto"  # "none", "auto", "required", or a tool's name


def parse_chat(body: dict, max_n: int) -> ChatRequest:
    fields = _generation_fields(body, max_n)
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise invalid("top_logprobs", "requires logprobs: true")
    tools = _tools(body.get("tools"))
    return ChatRequest(**fields, logprobs=logprobs, top_logprobs=top, messages=_messages(body.get("messages")),
                       response_format=_response_format(body.get("response_format")), tools=tools,
                       tool_choice=_tool_choice(body.get("tool_choice"), tools))


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "required: a non-empty list of messages", "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "expected an object with role and content", "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise invalid(f"{where}.role", f"expected one of {', '.join(sorted(_ROLES))}, got {json.dumps(role)}")
        message: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                   "content": _content(m.get("content"), f"{where}.content")}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _history_tool_calls(m["tool_calls"], f"{where}.tool_calls")
        elif message["content"] is None:
            raise invalid(f"{where}.content", "required", "missing_content")
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


def _content(value: Any, where: str) -> str | None:
    """Plain text; a list of parts may hold text parts only (this server reads no images or audio)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}[{j}]", f"only text parts are supported, got {json.dumps(kind)}",
                              "unsupported_content")
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}[{j}].text", "expected a string", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(where, "expected a string or a list of text parts", "invalid_type")


def _history_tool_calls(value: Any, where: str) -> list[dict]:
    """Earlier calls of the conversation, with arguments as objects (what templates render)."""
    if not isinstance(value, list):
        raise invalid(where, "expected a list", "invalid_type")
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{where}[{j}].function", "expected an object with a name", "invalid_type")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise invalid(f"{where}[{j}].function.arguments", "not valid JSON") from None
        calls.append({"id": call.get("id") or f"call_{j}", "type": "function",
                      "function": {"name": fn["name"], "arguments": arguments}})
    return calls


def _tools(value: Any) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools", "expected a list of tools", "invalid_type")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict):
            raise invalid(f"tools[{i}]", 'expected {"type": "function", "function": {...}}', "invalid_type")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise invalid(f"tools[{i}].function.name", "1-64 letters, digits, '_', '.' or '-'")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise invalid(f"tools[{i}].function.parameters", "expected a JSON schema object", "invalid_type")
        tools.append(ToolSpec(name, str(fn.get("description") or ""), params))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid("tools", "tool names must be unique")
    return tools


def _tool_choice(value: Any, tools: list[ToolSpec]) -> str:
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise invalid("tool_choice", 'expected "none", "auto", "required" or {"type": "function", ...}')
        if value != "none" and not tools:
            raise invalid("tool_choice", f'"{value}" needs tools')
        return value
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise invalid("tool_choice", 'expected {"type": "function", "function": {"name": ...}}', "invalid_type")
    if name not in {t.name for t in tools}:
        raise invalid("tool_choice", f"no tool named {json.dumps(name)} in tools")
    return name


def _response_format(value: Any) -> Any:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    from pie_local.runtime.constraints import ConstraintError, JsonSchema

    if kind == "json_object":
        return JsonSchema({"type": "object"})
    if kind != "json_schema":
        raise invalid("response_format", 'expected {"type": "text" | "json_object" | "json_schema", ...}')
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise invalid("response_format.json_schema.schema", "required: a JSON schema object", "invalid_type")
    try:
        return JsonSchema(schema)
    except ConstraintError as exc:
        raise invalid("response_format.json_schema.schema", str(exc), "invalid_schema") from None


# ---- /v1/completions -------------------------------------------------------------------------------


@dataclass
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False


def parse_completion(body: dict, max_n: int) -> CompletionRequest:
    fields = _generation_fields(body, max_n)
    top = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = _bool(body, "echo")
    if echo and top is not None:
        raise invalid("echo", "echo with logprobs (prompt log-probabilities) is not supported", "unsupported_parameter")
    if body.get("suffix"):
        raise invalid("suffix", "not supported by this server", "unsupported_parameter")
    best_of = _int(body, "best_of", None, 1)
    if best_of not in (None, fields["n"]):
        raise invalid("best_of", "not supported (use n, or the best-of-n inferlet)", "unsupported_parameter")
    prompts = _prompts(body.get("prompt"))
    if len(prompts) * fields["n"] > max_n:
        raise invalid("prompt", f"prompts x n must be at most {max_n}, got {len(prompts) * fields['n']}")
    return CompletionRequest(**fields, logprobs=top is not None, top_logprobs=top or 0, prompts=prompts, echo=echo)


def _prompts(value: Any) -> list[str | list[int]]:
    def token_list(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        return [value]
    if token_list(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) or token_list(p) for p in value):
        return list(value)
    raise invalid("prompt", "required: a string, a list of strings, or token ids", "invalid_type")


# ---- /v1/embeddings --------------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[str | list[int]]
    encoding_format: str = "float"  # "float": lists of numbers; "base64": little-endian float32 bytes
    dimensions: int | None = None  # accepted only when it is the model's own width (checked by the route)


def parse_embedding(body: dict) -> EmbeddingRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model", "required: a model name (GET /v1/models lists them)", "missing_model")
    inputs = _embedding_inputs(body.get("input"))
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format", f'expected "float" or "base64", got {json.dumps(encoding)}')
    dimensions = _int(body, "dimensions", None, 1)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "expected a string", "invalid_type")
    return EmbeddingRequest(model, inputs, encoding, dimensions)


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """OpenAI's input: a string, a list of strings, a list of token ids, or a list of those lists;
    nothing empty (an empty string, list or token list is refused, never embedded as nothing)."""
    def tokens(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if value is None:
        raise invalid("input", "required: a string, a list of strings, or token ids", "missing_input")
    if isinstance(value, str) or (tokens(value) and value):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise invalid("input", f"expected a string, a list of strings, or token ids; got {type(value).__name__}",
                      "invalid_type")
    if not items:
        raise invalid("input", "the list of inputs is empty")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise invalid("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}")
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 and item is value else f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise invalid(where, "an empty string has nothing to embed")
        elif tokens(item):
            if not item:
                raise invalid(where, "an empty list of token ids has nothing to embed")
            if any(t < 0 for t in item):
                raise invalid(where, "token ids must be >= 0")
        else:
            raise invalid(where, f"expected a string or a list of token ids, got {json.dumps(item)[:80]}",
                          "invalid_type")
    return list(items)
