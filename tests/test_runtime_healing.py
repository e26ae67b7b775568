"""Token healing on FakeDriver, with a byte vocabulary plus a few merged tokens ("http", "://"), so
a prompt can stop in the middle of the token the model would write."""

from __future__ import annotations

import pytest

from pie_local.driver.fake import FakeChatTemplate, FakeDriver, FakeTokenizer
from pie_local.driver.types import DriverParams
from pie_local.runtime import Engine, SamplingParams
from pie_local.runtime.constraints import Regex
from pie_local.runtime.healing import Healing, VocabIndex
from pie_local.runtime.logprobs import mask_to_bool

MERGED = [b"http", b"://", b"::", b"ab"]


class MergingTokenizer(FakeTokenizer):
    """FakeTokenizer plus MERGED (ids 261...), encoded greedily longest-first."""

    def __init__(self) -> None:
        super().__init__()
        self.base = self.n_vocab
        self.n_vocab += len(MERGED)

    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        ids = []
        for t in super().encode(text, add_special, parse_special):
            ids.append(t)
            for j, merged in enumerate(MERGED):  # merge the tail when it spells a merged token
                n = len(merged)
                if len(ids) >= n and all(i >= 5 and i < self.base for i in ids[-n:]) and \
                        bytes(i - 5 for i in ids[-n:]) == merged:
                    ids[-n:] = [self.base + j]
                    break
        return ids

    def piece(self, token_id: int, special: bool = True) -> bytes:
        if token_id >= self.base:
            return MERGED[token_id - self.base]
        return super().piece(token_id, special)


TOK = MergingTokenizer()
URL = TOK.base + MERGED.index(b"://")


def rule(visible: list[int]) -> int | None:
    """The model writes "://" after "http", then "example.com"; after a lone ":" it is lost ("?")."""
    text = b"".join(TOK.piece(t, special=False) for t in visible)
    if text.endswith(b"http"):
        return URL
    if text.endswith(b"http:"):
        return TOK.encode("?")[0]
    for i in range(1, len("example.com") + 1):
        if text.endswith(b"://" + b"example.com"[: i - 1]) and i <= len("example.com"):
            return TOK.encode("example.com"[i - 1])[0]
    return TOK.eos_id


def make_engine() -> Engine:
    driver = FakeDriver(DriverParams(page_size=4, n_pages=64, max_batch_tokens=64), n_vocab=TOK.n_vocab,
                        next_token=rule)
    return Engine(driver=driver, tokenizer=TOK, chat_template=FakeChatTemplate())


def test_vocab_index_and_the_healing_mask():
    index = VocabIndex(TOK, TOK.n_vocab)
    assert set(index.starting_with(b":")) == {TOK.encode(":")[0], URL, TOK.base + MERGED.index(b"::")}
    assert index.exactly(b"http") == [TOK.base]
    healing = Healing(b":/", index)
    allowed = set(mask_to_bool(healing.mask(), TOK.n_vocab).nonzero()[0].tolist())
    assert allowed == {URL, TOK.encode(":")[0]}  # begins with ":/", or is the shorter ":"
    healing.advance(b":")
    assert healing.active and healing.remaining == b"/"
    healing.advance(b"//x")
    assert not healing.active


async def test_healing_lets_the_model_write_the_token_that_spans_the_prompt_boundary():
    async with make_engine() as engine:
        plain = engine.context()
        plain.fill("See http:")
        assert plain.token_ids[-2:] == [TOK.base, TOK.encode(":")[0]]  # "http" ":" — mid-token
        assert await plain.generate(max_tokens=4) == "?"  # the model is lost after a lone ":"
        ctx = engine.context()
        ctx.fill("See http:")
        healed = await ctx.generate(max_tokens=20, heal=True)
        assert healed == "//example.com" and healed.finish_reason == "stop"
        assert healed.token_ids[0] == URL  # the token the model wanted, spanning the boundary
        assert ctx.text.endswith("See http://example.com") and ctx.text.count("http") == 1
        assert healed.prompt_tokens == len(TOK.encode("<bos>See http"))  # the ":" was taken back


async def test_healing_with_stop_strings_streaming_and_errors():
    async with make_engine() as engine:
        ctx = engine.context()
        ctx.fill("See http:")
        pieces = [p async for p in ctx.stream(max_tokens=20, stop=[".com"], heal=True)]
        assert "".join(pieces) == "//example" == ctx.last.text and ctx.last.stop == ".com"
        assert ctx.text.endswith("See http://example")  # the stop string left the context too
        # nothing to heal: a control token at the end, or a one-token context
        ctx = engine.context()
        ctx.fill("<start_of_turn>")
        result = await ctx.generate(max_tokens=1, heal=True)
        assert len(result.token_ids) <= 1 and ctx.token_ids[:2] == TOK.encode("<bos><start_of_turn>")
        with pytest.raises(ValueError, match="constrain"):
            await engine.context().fill("x").generate(heal=True, constrain=Regex("a"))
        # sampling under the healing mask keeps to it
        ctx = engine.context()
        ctx.fill("ab ab")
        sampled = await ctx.generate(SamplingParams(temperature=5.0, seed=1), max_tokens=3, heal=True)
        assert TOK.piece(sampled.token_ids[0]) in (b"a", b"ab")  # "ab" itself or its shorter piece
        assert ctx.text == "<bos>ab ab" + sampled
