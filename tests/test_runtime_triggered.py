"""Grammar on a trigger: free text until a trigger string or token appears, then a constraint until
it completes (llguidance grammars on the fake byte vocabulary, and generation on FakeDriver)."""

from __future__ import annotations

import json

import pytest

from pie_local.driver.fake import FakeDriver, FakeTokenizer
from pie_local.driver.types import DriverParams
from pie_local.runtime.constraints import (ConstraintError, Grammar, JsonSchema, Regex, Triggered,
                                           allowed_tokens)
from runtime_helpers import fake_engine

TOK = FakeTokenizer()
CALL = JsonSchema({"type": "object", "properties": {"expression": {"type": "string", "maxLength": 12}},
                   "required": ["expression"], "additionalProperties": False})


def feed(state, text: str) -> None:
    for t in TOK.encode(text, parse_special=True):
        state.advance(t)


def test_free_text_until_the_trigger_then_the_constraint():
    state = Triggered("<call>", CALL).bind(TOK)
    free = len(allowed_tokens(state.mask()))
    feed(state, "I need a tool: <cal")
    assert len(allowed_tokens(state.mask())) == free and state.is_accepting()  # still free text
    feed(state, "l>")
    assert TOK.decode(state.forced_tokens()) == '{"expression":"'  # the call has begun
    assert not state.is_accepting()
    with pytest.raises(ConstraintError):
        state.fork().advance(TOK.encode("x")[0])
    feed(state, '{"expression":"1+2"}')
    assert state.is_done()  # complete: the generation ends here


def test_repeat_token_trigger_and_nesting():
    state = Triggered("<call>", Regex("[0-9]+;"), repeat=True).bind(TOK)
    feed(state, "a <call>12; more text <call>3;")
    assert state.is_accepting() and not state.is_done()  # free text again after each call
    feed(state, " and the end")
    # a special token as the trigger
    state = Triggered(TOK.token_id("<start_of_turn>"), Grammar('start: "yes" | "no"')).bind(TOK)
    feed(state, "hello <start_of_turn>")
    assert sorted(TOK.decode([t]) for t in allowed_tokens(state.mask())) == ["n", "y"]
    # a triggered grammar inside another
    inner = Triggered(";", Regex("[a-z]+!"))
    state = Triggered("<call>", inner).bind(TOK)
    feed(state, "x <call>free again;then")
    assert not state.is_done()
    feed(state, "!")
    assert state.is_done()
    with pytest.raises(TypeError):
        Triggered("<call>", CALL & CALL)
    with pytest.raises(ConstraintError, match="empty"):
        Triggered("", CALL)


def rule_saying(text: str):
    """The fake model spells ``text`` after the prompt mark, then garbage."""
    mark = "Go:"

    def rule(visible: list[int]):
        said = TOK.decode(visible).split(mark, 1)[-1]
        if text.startswith(said) and len(said) < len(text):
            return TOK.encode(text[len(said)])[0]
        return TOK.encode("#")[0]

    return rule


async def test_generation_is_free_until_the_tag_and_the_call_is_forced_valid():
    driver = FakeDriver(DriverParams(page_size=4, n_pages=256, max_batch_tokens=128),
                        next_token=rule_saying('Let me compute. <call>{"expression":"6*7"}'))
    async with fake_engine(driver) as engine:
        ctx = engine.context()
        ctx.fill("Go:")
        text = await ctx.generate(max_tokens=80, constrain=Triggered("<call>", CALL))
        before, _, call = text.partition("<call>")
        assert before == "Let me compute. " and json.loads(call) == {"expression": "6*7"}
        assert text.finish_reason == "stop" and text.forced_tokens >= len('{"expression":"')
        # the model's garbage after the call never came: the constraint was complete
        # and without the tag, the text stays free (here: cut by max_tokens)
        ctx = engine.context()
        ctx.fill("Go:")
        free = await ctx.generate(max_tokens=30, constrain=Triggered("<never>", CALL))
        assert free.startswith("Let me compute. <call>{") and free.finish_reason == "length"
