"""JsonSchema's options: lenient compilation and what it relaxed, oneOf, layout, and keys that
never repeat in an object (the grammar alone repeats additionalProperties keys)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from pie_local.driver.fake import FakeTokenizer
from pie_local.models.tokenizer import Tokenizer
from pie_local.runtime.constraints import ConstraintError, JsonSchema, allowed_tokens
from test_constraints import random_generate

UNIQUE_TAGS = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
ONE_OF = {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 10}]}  # 12 matches both
MAP = {"type": "object", "additionalProperties": {"type": "integer"}}
ANYTHING = {"type": "object"}  # any keys, any values


@pytest.fixture(scope="module")
def tok(starter_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(starter_gguf)


def feed(state, tokenizer, text: str) -> None:
    for t in tokenizer.encode(text, parse_special=False):
        state.advance(t)


def repeated_keys(text: str) -> list[str]:
    """Keys that occur twice in one object, anywhere in the JSON text."""
    repeats: list[str] = []

    def pairs(items):
        keys = [k for k, _ in items]
        repeats.extend(k for k in set(keys) if keys.count(k) > 1)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return repeats


# ---- lenient compilation ------------------------------------------------------------------------

@pytest.mark.parametrize("schema, keywords", [
    (UNIQUE_TAGS, ("uniqueItems",)),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "dependencies": {"a": ["b"]}}, ("dependencies",)),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, ("if", "then")),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, ("propertyNames",)),
    ({"type": "string", "format": "color"}, ("format",)),
    ({"type": "string", "pattern": "^(?!no)[a-z]+$"}, ("pattern",)),
    ({"type": "object", "patternProperties": {"^(?!x)": {"type": "integer"}}}, ("patternProperties",)),
    (ONE_OF, ("oneOf",)),
])
def test_lenient_compiles_and_names_what_it_relaxed(schema: dict, keywords: tuple[str, ...]) -> None:
    constraint = JsonSchema(schema)
    assert constraint.relaxed == keywords and constraint.warnings
    with pytest.raises(ConstraintError, match="invalid JSON schema"):
        JsonSchema(schema, lenient=False, coerce_one_of=False)


def test_a_schema_llguidance_enforces_fully_relaxes_nothing() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False}
    assert JsonSchema(schema).relaxed == () and JsonSchema(schema).warnings == []
    # oneOf of disjoint types is provably anyOf: nothing is relaxed, even strictly
    exact = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    assert JsonSchema(exact, lenient=False, coerce_one_of=False).relaxed == ()


def test_coerce_one_of_alone_compiles_one_of_but_not_unknown_keywords() -> None:
    assert JsonSchema(ONE_OF, lenient=False).relaxed == ("oneOf",)
    with pytest.raises(ConstraintError, match="uniqueItems"):
        JsonSchema(UNIQUE_TAGS, lenient=False)


def test_relaxed_values_only_break_the_relaxed_keyword(tok: Tokenizer) -> None:
    """uniqueItems is not enforced: a random chooser repeats items; every other rule still holds."""
    schema = {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 3, "maxItems": 3, "uniqueItems": True}
    outputs = [json.loads(random_generate(JsonSchema(schema).bind(tok), tok, np.random.default_rng(seed)))
               for seed in range(4)]
    for value in outputs:
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(value))
        assert {e.validator for e in errors} == {"uniqueItems"}  # 3 items from 2: always repeated


# ---- layout -------------------------------------------------------------------------------------

def test_layout_options(tok: Tokenizer) -> None:
    schema = {"type": "object", "properties": {"a": {"const": 1}, "b": {"const": [1, 2]}}, "required": ["a", "b"],
              "additionalProperties": False}
    compact = random_generate(JsonSchema(schema).bind(tok), tok, np.random.default_rng(0))
    assert compact == '{"a":1,"b":[1,2]}'
    spaced = JsonSchema(schema, item_separator=", ", key_separator=": ")
    assert random_generate(spaced.bind(tok), tok, np.random.default_rng(0)) == '{"a": 1, "b": [1, 2]}'
    flexible = JsonSchema(schema, whitespace_flexible=True).bind(tok)
    feed(flexible, tok, "{")
    assert any(tok.decode([t]).isspace() for t in allowed_tokens(flexible.mask()))


# ---- keys never repeat --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ['{"a":1,"a', '{"a":{"a":1},"a', '{"a":1,"b":{"c":2},"a', '{"\\n":1,"\\u000a', '[{"x":[1],"x'])
def test_a_key_its_object_has_cannot_be_closed(text: str) -> None:
    fake = FakeTokenizer()
    quote = fake.encode('"')[0]
    state = JsonSchema(ANYTHING if text.startswith("{") else {"type": "array", "items": ANYTHING}).bind(fake)
    feed(state, fake, text)
    assert quote not in allowed_tokens(state.mask())
    with pytest.raises(ConstraintError, match="repeat a key"):
        state.advance(quote)
    other = JsonSchema(MAP, unique_keys=False).bind(fake)  # the grammar alone would allow it
    feed(other, fake, '{"a":1,"a')
    assert quote in allowed_tokens(other.mask())


def test_other_keys_and_inner_objects_stay_free() -> None:
    fake = FakeTokenizer()
    state = JsonSchema(ANYTHING).bind(fake)
    feed(state, fake, '{"a":1,"ab":2,"b":{"a":1,"ab":2},"c":3}')  # "a" again, but in another object
    assert state.is_accepting()


def test_whole_key_tokens_of_a_real_vocab(tok: Tokenizer) -> None:
    state = JsonSchema({"type": "object", "properties": {"name": {"type": "string"}},
                        "additionalProperties": {"type": "integer"}}).bind(tok)
    feed(state, tok, '{"name":"Ada","age":3,')
    ids = tok.encode('"age":', parse_special=False)
    for t in ids[:-1]:
        state.advance(t)
    # the tokens that would close "age" again ('":' and friends) are gone; longer keys remain
    allowed = {tok.decode([t]) for t in allowed_tokens(state.mask())}
    assert tok.decode(ids[-1:]) not in allowed and not any(a.startswith('"') for a in allowed)
    assert {"s", "_"} & allowed


def test_fork_and_rollback_keep_each_branch_keys() -> None:
    fake = FakeTokenizer()
    quote = fake.encode('"')[0]
    state = JsonSchema(MAP).bind(fake)
    feed(state, fake, '{"a":1,')
    child = state.fork()
    feed(child, fake, '"b":2,"')
    feed(state, fake, '"')
    feed(child, fake, "b")
    feed(state, fake, "b")
    assert quote not in allowed_tokens(child.mask()) and quote in allowed_tokens(state.mask())
    child.rollback(len('b":2,"b'))
    feed(child, fake, "b")
    assert quote in allowed_tokens(child.mask())


@pytest.mark.parametrize("schema", [
    {"type": "object", "patternProperties": {"^[ab]$": {"type": "integer"}}, "additionalProperties": False,
     "maxProperties": 2},
    {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
     "patternProperties": {"^[xy]$": {"enum": [1, 2]}}, "additionalProperties": False, "maxProperties": 3},
])
def test_random_outputs_never_repeat_a_key(tok: Tokenizer, schema: dict) -> None:
    """An adversarial chooser repeats keys when the grammar lets it; with unique_keys it cannot."""
    def outputs(unique_keys: bool) -> list[str]:
        constraint = JsonSchema(schema, unique_keys=unique_keys)
        return [random_generate(constraint.bind(tok), tok, np.random.default_rng(seed)) for seed in range(12)]

    assert any(repeated_keys(text) for text in outputs(unique_keys=False))
    for text in outputs(unique_keys=True):
        assert not repeated_keys(text), text
        errors = jsonschema.Draft202012Validator(schema).iter_errors(json.loads(text))
        assert {e.validator for e in errors} <= set(JsonSchema(schema).relaxed), text
