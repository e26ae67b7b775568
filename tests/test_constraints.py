"""Constraints driven by a random token chooser restricted by the mask: output must always conform."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from pie_local.models.tokenizer import Tokenizer
from pie_local.runtime.constraints import (AllOf, ConstraintError, ConstraintState, Grammar, JsonSchema, Regex,
                                           allowed_tokens, as_constraint, mask_words)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok(starter_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(starter_gguf)


def random_generate(state: ConstraintState, tok: Tokenizer, rng: np.random.Generator, max_tokens: int = 300) -> str:
    """Sample uniformly among allowed tokens (an adversarial 'model'); stop on EOS like the engine."""
    out: list[int] = []
    for _ in range(max_tokens):
        mask = state.mask()
        assert mask.dtype == np.uint32 and mask.shape == (mask_words(tok.n_vocab),)
        allowed = allowed_tokens(mask)
        assert len(allowed) > 0
        eos = [t for t in allowed if t in tok.eos_ids]
        # Finish soon once finishing is allowed, otherwise random text may run to max_tokens.
        token = int(rng.choice(eos)) if eos and rng.random() < 0.5 else int(rng.choice(allowed))
        state.advance(token)
        if token in tok.eos_ids:
            break
        out.append(token)
    assert state.is_done(), f"not finished after {max_tokens} tokens: {tok.decode(out)!r}"
    return tok.decode(out)


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_always_validates(tok: Tokenizer, seed: int) -> None:
    text = random_generate(JsonSchema(PERSON).bind(tok), tok, np.random.default_rng(seed))
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_union_and_nesting(tok: Tokenizer, seed: int) -> None:
    schema = {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "point"}, "xy": {
            "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
         "required": ["kind", "xy"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "label"}, "text": {"type": "string", "pattern": "^[A-Z]{2,5}$"}},
         "required": ["kind", "text"], "additionalProperties": False},
    ]}
    text = random_generate(JsonSchema(json.dumps(schema)).bind(tok), tok, np.random.default_rng(seed))
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)!?", r"#[0-9a-f]{6}", r"[A-Z][a-z]{1,6}( [A-Z][a-z]{1,6}){0,2}\."])
@pytest.mark.parametrize("seed", range(3))
def test_regex_output_fullmatches(tok: Tokenizer, pattern: str, seed: int) -> None:
    text = random_generate(Regex(pattern).bind(tok), tok, np.random.default_rng(seed))
    assert re.fullmatch(pattern, text), text


def test_lark_grammar(tok: Tokenizer) -> None:
    lark = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""
    rng = np.random.default_rng(0)
    for _ in range(5):
        text = random_generate(Grammar(lark).bind(tok), tok, rng)
        assert re.fullmatch(r"[0-9()+\-]+", text) and text.count("(") == text.count(")"), text
        ast.parse(text, mode="eval")  # well-formed arithmetic: parses without SyntaxError


def test_gbnf_grammar_is_converted(tok: Tokenizer) -> None:
    gbnf = 'root ::= answer "." \nanswer ::= "yes" | "no" | "it depends"'
    rng = np.random.default_rng(1)
    outputs = {random_generate(Grammar(gbnf).bind(tok), tok, rng) for _ in range(12)}
    assert outputs <= {"yes.", "no.", "it depends."} and len(outputs) >= 2


def test_all_of_combines_masks(tok: Tokenizer) -> None:
    both = AllOf(Regex(r"[a-z]{2,8}"), Regex(r"[a-m]*z?"))
    rng = np.random.default_rng(3)
    for _ in range(5):
        text = random_generate(both.bind(tok), tok, rng)
        assert re.fullmatch(r"[a-z]{2,8}", text) and re.fullmatch(r"[a-m]*z?", text), text
    # The AND of masks is exactly the intersection of the two masks.
    a, b = Regex(r"[a-z]{2,8}").bind(tok).mask(), Regex(r"[a-m]*z?").bind(tok).mask()
    assert np.array_equal(both.bind(tok).mask(), a & b)
    # Operator form and list form are the same thing.
    assert isinstance(Regex("a") & Regex("a|b"), AllOf)
    assert isinstance(as_constraint([Regex("a"), Regex("a|b")]), AllOf)
    assert as_constraint(None) is None and as_constraint([]) is None


def test_contradicting_constraints_error(tok: Tokenizer) -> None:
    state = AllOf(Regex("[0-9]+"), Regex("[a-z]+")).bind(tok)
    with pytest.raises(ConstraintError, match="contradict"):
        state.mask()


def test_mask_allows_exactly_the_right_first_tokens(tok: Tokenizer) -> None:
    state = Regex("(yes|no)").bind(tok)
    allowed = set(allowed_tokens(state.mask()).tolist())
    decoded = {tok.decode([t]) for t in allowed}
    assert decoded <= {"y", "ye", "yes", "n", "no"} and {"yes", "no"} <= decoded
    assert not allowed & tok.eos_ids  # cannot stop before a match
    for t in tok.encode("yes"):
        state.advance(t)
    assert state.is_accepting()
    assert set(allowed_tokens(state.mask()).tolist()) == tok.eos_ids  # only stopping is left
    state.advance(tok.eos_id)
    assert state.is_done()


def test_disallowed_token_is_an_error(tok: Tokenizer) -> None:
    state = Regex("[0-9]+").bind(tok)
    with pytest.raises(ConstraintError, match="not allowed"):
        state.advance(tok.encode("Hello")[0])


def test_fork_and_rollback(tok: Tokenizer) -> None:
    state = JsonSchema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                        "additionalProperties": False}).bind(tok)
    prefix = tok.encode('{"n":')
    for t in prefix:
        state.advance(t)
    child = state.fork()
    for t in tok.encode("12}"):
        child.advance(t)
    assert child.is_accepting() and not state.is_accepting()
    assert np.array_equal(state.mask(), state.fork().mask())
    child.rollback(len(tok.encode("12}")))
    assert np.array_equal(child.mask(), state.mask())


def test_forced_bytes(tok: Tokenizer) -> None:
    state = JsonSchema({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
                        "additionalProperties": False}).bind(tok)
    assert state.forced_bytes() == b'{"answer":"'


@pytest.mark.parametrize("make, message", [
    (lambda: JsonSchema({"type": "nonsense"}), "invalid JSON schema"),
    (lambda: JsonSchema("{not json"), "not JSON"),
    (lambda: JsonSchema(["a list"]), "expected an object"),
    (lambda: JsonSchema({"properties": {"a": {"$ref": "#/nowhere"}}}), "nowhere"),
    (lambda: Regex("(unclosed"), "unclosed group"),
    (lambda: Grammar("start: undefined_rule"), "undefined_rule"),
    (lambda: Grammar("root ::= ("), "GBNF"),
    (lambda: AllOf(), "at least one"),
])
def test_invalid_constraints_have_clear_errors(make, message: str) -> None:
    with pytest.raises(ConstraintError, match=message):
        make()


def test_works_with_the_fake_tokenizer() -> None:
    fake = pytest.importorskip("pie_local.driver.fake")
    tok = fake.FakeTokenizer()
    state = Regex("ab+").bind(tok)
    assert mask_words(tok.n_vocab) == state.mask().shape[0]
    for t in tok.encode("abbb"):
        state.advance(t)
    assert state.is_accepting()


def test_bind_rejects_non_tokenizers() -> None:
    with pytest.raises(TypeError, match="llguidance_tokenizer"):
        Regex("a").bind(object())
