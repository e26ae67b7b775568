"""Reasoning budgets on FakeDriver: the reasoning block gets a token budget, then its closing tag
is forced (in one pass with the next sampled token) and the answer generated; the reasoning comes
back apart from the answer."""

from __future__ import annotations

import pytest

from pie_local.driver.fake import FakeDriver, FakeTokenizer
from pie_local.driver.types import DriverParams
from pie_local.runtime import Reasoning
from pie_local.runtime.constraints import Regex, Triggered
from pie_local.runtime.reasoning import ReasoningSplitter
from runtime_helpers import fake_engine

TOK = FakeTokenizer()


def thinker(answer: str, thoughts: str | None = None):
    """A fake reasoning model: inside <think> it muses "hmm " forever (or says ``thoughts`` and
    closes the block itself); after </think> it says ``answer`` and ends."""

    def rule(visible: list[int]):
        text = TOK.decode(visible)
        if "</think>" in text:
            said = text.split("</think>", 1)[1]
            reply = "\n\n" + answer
            return TOK.encode(reply[len(said)])[0] if len(said) < len(reply) else TOK.eos_id
        if "<think>" in text:
            said = text.split("<think>", 1)[1].lstrip("\n")
            if thoughts is not None:
                reply = thoughts + "</think>"
                return TOK.encode(reply[len(said)])[0]
            return TOK.encode("hmm "[len(said) % 4])[0]
        return TOK.encode("<think>"[len(text.split("Q?", 1)[1])])[0]  # opens the block itself

    return rule


def make_engine(rule):
    return fake_engine(FakeDriver(DriverParams(page_size=4, n_pages=256, max_batch_tokens=128), next_token=rule))


@pytest.mark.parametrize("chunks", [["<think>abc</think>\n\nanswer"], list("<think>abc</think>\n\nanswer"),
                                    ["  <thi", "nk>a", "bc</th", "ink>", "\n", "\nans", "wer"]])
def test_splitter_separates_reasoning_and_answer_however_the_text_arrives(chunks):
    splitter = ReasoningSplitter(Reasoning(budget=5), prompt_tail="Q?")
    answer = "".join(splitter.push(c) for c in chunks) + splitter.finish()
    assert answer == "answer" and splitter.reasoning == "abc"


def test_splitter_without_a_block_and_with_one_opened_by_the_prompt():
    plain = ReasoningSplitter(Reasoning(budget=5), prompt_tail="Q?")
    assert plain.push("<") == "" and plain.push("b>bold") == "<b>bold" and plain.phase == "answer"
    opened = ReasoningSplitter(Reasoning(budget=5), prompt_tail="Q?<think>\n")
    assert opened.thinking and opened.push("still thinking</thi") == "" and opened.finish() == ""
    assert opened.reasoning == "still thinking</thi"  # cut off inside the block: all of it is reasoning


async def test_the_budget_closes_the_block_and_the_answer_follows():
    async with make_engine(thinker("42")) as engine:
        ctx = engine.context()
        ctx.fill("Q? <think>\n")
        pieces = [p async for p in ctx.stream(max_tokens=100, reasoning=10)]
        result = ctx.last
        assert "".join(pieces) == result.text == "42"  # the stream is the answer only
        # ten tokens of reasoning, then the forced tag (also generated inside the block)
        assert result.reasoning_tokens == 10 + len("</think>") and result.reasoning == "hmm hmm hm"
        assert result.forced_tokens == len("</think>") and result.finish_reason == "stop"
        assert ctx.text.endswith("<think>\nhmm hmm hm</think>\n\n42")
        # the closing tag went in with the pass that sampled the answer's first token
        assert result.forward_passes == len(result.token_ids) - result.forced_tokens + 1  # + the EOS pass


async def test_a_model_that_closes_the_block_itself_and_one_that_never_opens_it():
    async with make_engine(thinker("yes", thoughts="short")) as engine:
        ctx = engine.context()
        ctx.fill("Q?")
        result = await ctx.generate(max_tokens=100, reasoning=Reasoning(budget=50))
        assert result == "yes" and result.reasoning == "short" and result.forced_tokens == 0
        assert result.reasoning_tokens == len("short</think>")
    never = lambda visible: TOK.encode("x")[0] if len(visible) < 8 else TOK.eos_id  # noqa: E731
    async with make_engine(never) as engine:
        ctx = engine.context()
        ctx.fill("Q?")
        result = await ctx.generate(max_tokens=20, reasoning=5)
        assert result == "xxxxx" and result.reasoning == "" and result.reasoning_tokens == 0


async def test_the_answer_under_a_grammar_triggered_by_the_closing_tag():
    async with make_engine(thinker("forty-two")) as engine:
        ctx = engine.context()
        ctx.fill("Q? <think>\n")
        result = await ctx.generate(max_tokens=60, reasoning=Reasoning(budget=6),
                                    constrain=Triggered("</think>", Regex("\n\n[0-9]+")))
        assert result.reasoning == "hmm hm" and result.isdigit()  # the model's words were not allowed
        assert result.forced_tokens == len("</think>\n\n")  # the tag, then what the grammar forces
        with pytest.raises(ValueError, match="budget"):
            Reasoning(budget=-1)
