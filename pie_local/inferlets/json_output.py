"""JSON output under a JSON schema: every token is sampled under the schema's grammar mask, so the
result always parses and validates (unless --max-tokens cuts it off, which is an error). What the
schema forces (keys, quotes, commas) is not sampled: it goes into the KV with the next sampled
token's forward pass (--no-fast-forward samples it token by token, one pass each)."""

from __future__ import annotations

import json

from pie_local import JsonSchema, Param, SamplingParams

NAME = "json-output"
DESCRIPTION = "Generate JSON that follows a JSON schema (constrained decoding); returns the parsed value."

DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}

PARAMETERS = {
    "prompt": Param(str, required=True, help="what to describe, e.g. 'A person named Ada, 36, mathematician.'"),
    "schema": Param(str, default=json.dumps(DEFAULT_SCHEMA), help="JSON schema (text, or @path/to/schema.json)"),
    "max_tokens": Param(int, default=256, help="tokens at most"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
    "fast_forward": Param(bool, default=True,
                          help="put the tokens the schema forces (keys, punctuation) into the KV in one pass"),
}


def load_schema(text: str) -> dict:
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as f:
            text = f.read()
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("--schema must be a JSON object")
    return schema


async def main(rt, args):
    schema = load_schema(args.schema)
    constraint = JsonSchema(schema)
    ctx = rt.context()
    ctx.fill(f"{args.prompt}\nJSON matching the schema {json.dumps(schema, separators=(',', ':'))}:\n")
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
    async for piece in ctx.stream(sampling, max_tokens=args.max_tokens, constrain=constraint,
                                  fast_forward=args.fast_forward):
        rt.emit(piece)
    text = ctx.last.text
    if ctx.last.finish_reason == "length":
        raise ValueError(f"the JSON was cut off after {args.max_tokens} tokens; raise --max-tokens "
                         f"or bound the schema (maxLength, maxItems): {text!r}")
    return json.loads(text)
