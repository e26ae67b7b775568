"""JSON output under a JSON schema: every token is sampled under the schema's grammar mask, so the
result always parses and validates (unless --max-tokens cuts it off, which is an error). What the
schema forces (keys, quotes, commas) is not sampled: it goes into the KV with the next sampled
token's forward pass (--no-fast-forward samples it token by token, one pass each).

Keywords the grammar cannot enforce (uniqueItems, dependencies, if/then, ...) are ignored by
default and named in a "relaxed" message; --no-lenient refuses such a schema instead.

    pie-local run json-output -- --schema person.json --prompt 'Ada Lovelace, 36, mathematician'
"""

from __future__ import annotations

import json
import os

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
    "schema": Param(str, default=json.dumps(DEFAULT_SCHEMA), help="JSON schema: a file path, @path, or the JSON text"),
    "max_tokens": Param(int, default=256, help="tokens at most"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
    "fast_forward": Param(bool, default=True,
                          help="put the tokens the schema forces (keys, punctuation) into the KV in one pass"),
    "lenient": Param(bool, default=True, help="ignore keywords the grammar cannot enforce (--no-lenient: refuse the schema)"),
    "coerce_one_of": Param(bool, default=True, help="enforce oneOf as anyOf where they may differ"),
    "unique_keys": Param(bool, default=True, help="never repeat a key in an object"),
    "whitespace_flexible": Param(bool, default=False, help="allow any JSON whitespace between tokens; compact otherwise"),
    "whitespace_pattern": Param(str, default=None, help="regex for the whitespace allowed between tokens"),
    "item_separator": Param(str, default=None, help="regex for the separator between items (default ',')"),
    "key_separator": Param(str, default=None, help="regex for the separator after a key (default ':')"),
}


def load_schema(text: str) -> dict:
    """The schema from JSON text, `@path` or a path to a JSON file."""
    path = text[1:] if text.startswith("@") else text
    if text.startswith("@") or (not text.lstrip().startswith("{") and os.path.isfile(path)):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--schema is not valid JSON (nor a file): {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("--schema must be a JSON object")
    return schema


def constraint_from(args) -> JsonSchema:
    return JsonSchema(load_schema(args.schema), lenient=args.lenient, coerce_one_of=args.coerce_one_of,
                      unique_keys=args.unique_keys, whitespace_flexible=args.whitespace_flexible,
                      whitespace_pattern=args.whitespace_pattern, item_separator=args.item_separator,
                      key_separator=args.key_separator)


async def main(rt, args):
    constraint = constraint_from(args)
    if constraint.relaxed:
        rt.send({"event": "relaxed", "keywords": list(constraint.relaxed), "warnings": constraint.warnings})
    ctx = rt.context()
    ctx.fill(f"{args.prompt}\nJSON matching the schema {json.dumps(constraint.schema, separators=(',', ':'))}:\n")
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
    async for piece in ctx.stream(sampling, max_tokens=args.max_tokens, constrain=constraint,
                                  fast_forward=args.fast_forward):
        rt.emit(piece)
    text = ctx.last.text
    if ctx.last.finish_reason == "length":
        raise ValueError(f"the JSON was cut off after {args.max_tokens} tokens; raise --max-tokens "
                         f"or bound the schema (maxLength, maxItems): {text!r}")
    return json.loads(text)
