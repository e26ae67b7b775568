"""Context, generation, stop logic, chat, constraints, tools and the Forward API on FakeDriver."""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np
import pytest

from pie_local.driver.fake import FakeDriver, FakeTokenizer
from pie_local.driver.types import DriverParams
from pie_local.runtime import ContextBusyError, Engine, SamplingParams, brle
from pie_local.runtime.sampling import StopChecker
from runtime_helpers import fake_engine

TOK = FakeTokenizer()
MARK = "<start_of_turn>model\n"


def scripted(reply_for: Callable[[str], str]) -> Callable[[list[int]], int | None]:
    """A FakeDriver rule: after the last MARK in the visible text, the model spells out
    ``reply_for(text before MARK)`` byte by byte, then says <end_of_turn>."""

    def rule(visible: list[int]) -> int | None:
        data = b"".join(TOK.piece(t) for t in visible)
        at = data.rfind(MARK.encode())
        if at < 0:
            return None
        said = data[at + len(MARK):]
        reply = reply_for(data[:at].decode("utf-8", "replace")).encode()
        if len(said) < len(reply) and reply.startswith(said):
            return TOK.encode(reply[len(said):][:1].decode("latin-1"), parse_special=False)[0] \
                if reply[len(said)] < 128 else 5 + reply[len(said)]
        return TOK.token_id("<end_of_turn>")

    return rule


def make_engine(rule=None, page_size: int = 4, **kw) -> tuple[Engine, FakeDriver]:
    driver = FakeDriver(DriverParams(page_size=page_size, n_pages=256, max_batch_tokens=64), next_token=rule, **kw)
    return fake_engine(driver), driver


# ---- stop logic ---------------------------------------------------------------------------------

def test_stop_checker_holds_back_possible_stop_prefixes():
    c = StopChecker(["STOP", "END"])
    assert [c.push(p) for p in ["ab", "S", "T", "x", "E"]] == ["ab", "", "", "STx", ""]
    assert c.push("N") == "" and c.push("D tail") == "" and c.stopped and c.matched == "END"
    c = StopChecker(["STOP"])
    assert c.push("abST") == "ab" and c.finish() == "ST" and not c.stopped


async def test_stop_string_cuts_text_and_context():
    engine, _ = make_engine(scripted(lambda p: "Hello STOP world"))
    async with engine:
        ctx = engine.context()
        ctx.fill("question" + MARK)
        prompt_len = len(ctx)
        pieces = [p async for p in ctx.stream(stop=["STOP"], max_tokens=50)]
        assert "".join(pieces) == "Hello " and pieces == list("Hello ")
        assert ctx.last.finish_reason == "stop" and ctx.last.stop == "STOP"
        # the context holds exactly the returned text after the prompt
        assert TOK.decode(ctx.token_ids[prompt_len:]) == "Hello "


async def test_stop_string_inside_a_token_keeps_the_text_before_it():
    # byte tokens can't split, so use a stop string that starts mid-way through the reply's bytes
    engine, _ = make_engine(scripted(lambda p: "abcXYZdef"))
    async with engine:
        ctx = engine.context()
        ctx.fill("q" + MARK)
        n = len(ctx)
        assert await ctx.generate(stop=["cXY"], max_tokens=50) == "ab"
        assert TOK.decode(ctx.token_ids[n:]) == "ab"


async def test_eos_stops_and_is_not_kept():
    engine, _ = make_engine(scripted(lambda p: "short"))
    async with engine:
        ctx = engine.context()
        ctx.fill("q" + MARK)
        n = len(ctx)
        assert await ctx.generate(max_tokens=50) == "short"
        assert ctx.last.finish_reason == "stop" and ctx.last.stop == "<end_of_turn>"
        assert ctx.token_ids[n:] == TOK.encode("short")
        # the script's tokens are near-certain under the toy model
        assert len(ctx.last.logprobs) == 5 and all(-1e-3 < lp <= 0 for lp in ctx.last.logprobs)
        # generating again recomputes the last token's logits and the script says EOS again
        assert await ctx.generate(max_tokens=3) == "" and ctx.last.finish_reason == "stop"
        assert ctx.token_ids[n:] == TOK.encode("short")


async def test_max_tokens_and_multibyte_streaming():
    engine, _ = make_engine(scripted(lambda p: "héllo wörld"))
    async with engine:
        ctx = engine.context()
        ctx.fill("q" + MARK)
        pieces = [p async for p in ctx.stream(max_tokens=4)]  # h, é (2 bytes), l
        assert "".join(pieces) == "hél" and ctx.last.finish_reason == "length"
        assert len(ctx.last.token_ids) == 4 and "é" in pieces


async def test_greedy_is_deterministic_and_seeded_sampling_reproducible():
    engine, _ = make_engine()
    async with engine:
        outs = []
        for sampling in [None, None, SamplingParams(temperature=0.9, top_p=0.9, seed=7),
                         SamplingParams(temperature=0.9, top_p=0.9, seed=7), SamplingParams(temperature=0.9, seed=8)]:
            ctx = engine.context()
            ctx.fill("same prompt")
            await ctx.generate(sampling, max_tokens=12)
            outs.append(ctx.last.token_ids)
            ctx.release()
        assert outs[0] == outs[1] and outs[2] == outs[3] and outs[3] != outs[4]
        assert outs[0] != outs[2]


# ---- chat ---------------------------------------------------------------------------------------

async def test_chat_turns_follow_the_template_and_close_each_reply():
    engine, driver = make_engine(scripted(lambda p: "Paris." if "France" in p.rsplit("user", 1)[-1] else "Berlin."))
    async with engine:
        ctx = engine.context()
        ctx.system("Be brief.")
        ctx.user("Capital of France?")
        assert await ctx.generate() == "Paris."
        ctx.user("And Germany?")
        assert await ctx.generate() == "Berlin."
        expected = engine.chat_template.render(ctx.messages, add_generation_prompt=False)
        assert ctx.text == "<bos>" + expected
        assert [m["role"] for m in ctx.messages] == ["system", "user", "assistant", "user", "assistant"]
        # the second turn did not recompute the first: only the new user turn, the prompt and the reply
        ctx2 = engine.context()
        before = driver.stats.tokens
        ctx2.system("Be brief.")
        await ctx2.flush()
        assert driver.stats.tokens - before <= 4  # the system turn is in the prefix cache (partial page only)


# ---- constraints --------------------------------------------------------------------------------

class DigitsOnly:
    """A tiny constraint: 3 ASCII digits, then end of generation."""

    def bind(self, tokenizer):
        return _DigitsState(tokenizer)


class _DigitsState:
    def __init__(self, tok):
        self.tok, self.n = tok, 0

    def mask(self) -> np.ndarray:
        allowed = np.zeros(self.tok.n_vocab, dtype=bool)
        if self.n < 3:
            for d in b"0123456789":
                allowed[5 + d] = True
        else:
            allowed[list(self.tok.eos_ids)] = True
        return _pack(allowed)

    def advance(self, token: int) -> None:
        self.n += 1

    def is_done(self) -> bool:
        return self.n > 3


def _pack(allowed: np.ndarray) -> np.ndarray:
    words = np.zeros((len(allowed) + 31) // 32, dtype=np.uint32)
    for i in np.flatnonzero(allowed):
        words[i // 32] |= np.uint32(1 << (i % 32))
    return words


async def test_constraint_mask_reaches_the_driver():
    engine, _ = make_engine()
    async with engine:
        for seed in range(3):
            ctx = engine.context()
            ctx.fill("number:")
            text = await ctx.generate(SamplingParams(temperature=1.0, seed=seed), max_tokens=20, constrain=DigitsOnly())
            assert len(text) == 3 and text.isdigit() and ctx.last.finish_reason == "stop"


async def test_llguidance_regex_on_the_fake_vocab():
    from pie_local.runtime.constraints import Regex

    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("id:")
        text = await ctx.generate(SamplingParams(temperature=1.0, seed=3), max_tokens=30,
                                  constrain=Regex(r"[a-c]{2}-[0-9]{3}"))
        import re

        assert re.fullmatch(r"[a-c]{2}-[0-9]{3}", text), text


# ---- tools --------------------------------------------------------------------------------------

async def test_tool_call_runs_inline_and_the_answer_continues_the_same_kv():
    calls = []

    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: first
            b: second
        """
        calls.append((a, b))
        return a + b

    def reply(prompt: str) -> str:
        last_turn = prompt.rsplit("<start_of_turn>", 1)[-1]
        if last_turn.startswith("tool"):
            return "The sum is " + last_turn.split("\n", 1)[1].split("<end_of_turn>")[0]
        return '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'

    engine, driver = make_engine(scripted(reply))
    async with engine:
        ctx = engine.context()
        ctx.user("What is 2 + 40?")
        text = await ctx.generate(tools=[add])
        assert calls == [(2, 40)]
        assert text.endswith("The sum is 42")
        assert [c.name for c in ctx.last.tool_calls] == ["add"]
        assert [m["role"] for m in ctx.messages] == ["user", "assistant", "tool", "assistant"]
        # everything was computed once: the driver saw each context token at most once (+1 recompute)
        assert driver.stats.tokens <= len(ctx) + 1


# ---- forward API --------------------------------------------------------------------------------

async def test_forward_masks_positions_and_probes():
    engine, driver = make_engine()
    async with engine:
        a = engine.context()
        a.fill_tokens([10, 11, 12, 13, 14, 15])
        await a.flush()
        b = a.fork1()
        # a full-causal BRLE mask is the same as no mask
        plain = await a.forward().input([20]).probe(0, top_k=5, entropy=True, logits=True).execute()
        full = await b.forward().input([20], masks=[brle([True] * 7)]).probe(0, logits=True).execute()
        np.testing.assert_array_equal(plain.logits, full.logits)
        assert plain.top_ids.shape == (1, 5) and plain.top_probs[0, 0] >= plain.top_probs[0, 1]
        assert plain.entropy[0] > 0
        # hiding KV changes what the token sees; so do other positions
        c = a.fork1()
        c.truncate(6)
        hidden = await c.forward().input([20], masks=[[0, 1, 3, 3]]).probe(0, logits=True).execute()
        assert not np.array_equal(hidden.logits, plain.logits)
        np.testing.assert_array_equal(hidden.logits[0], driver.logits_for([(10, 0), (14, 4), (15, 5), (20, 6)]))
        d = a.fork1()
        d.truncate(6)
        moved = await d.forward().input([20], positions=[100]).probe(0, logits=True).execute()
        assert not np.array_equal(moved.logits, plain.logits)
        assert d.next_position == 101


async def test_forward_sample_rows_and_logit_mask():
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        mask = np.zeros((TOK.n_vocab + 31) // 32, dtype=np.uint32)
        mask[(5 + ord("z")) // 32] |= np.uint32(1 << ((5 + ord("z")) % 32))
        out = await ctx.forward().input(TOK.encode("abc")).sample([1, 2], logit_mask=mask).execute()
        assert out.rows == [1, 2] and out.token_at(2) == 5 + ord("z") and out.token_at(1) == 5 + ord("z")
        assert len(ctx) == 3 and ctx.kv_len == 3


async def test_truncate_then_generate_matches_a_fresh_context():
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill_tokens(list(range(10, 23)))
        await ctx.generate(max_tokens=5)
        ctx.truncate(9)  # inside a shared-able full page: copy-on-write on the next write
        ctx.fill_tokens([50, 51])
        got = await ctx.generate(max_tokens=5)
        fresh = engine.context()
        fresh.fill_tokens(list(range(10, 19)) + [50, 51])
        assert await fresh.generate(max_tokens=5) == got


async def test_context_busy_and_errors():
    engine, _ = make_engine(delay=0.02)
    async with engine:
        ctx = engine.context()
        ctx.fill("x")
        task = asyncio.ensure_future(ctx.flush())
        await asyncio.sleep(0.005)
        with pytest.raises(ContextBusyError):
            ctx.fork1()
        await task
        empty = engine.context()
        with pytest.raises(ValueError, match="empty"):
            await empty.generate()
        with pytest.raises(ValueError, match="out of range"):
            ctx.fill_tokens([10**6])


async def test_leaving_a_chat_stream_early_still_closes_the_turn():
    engine, _ = make_engine(scripted(lambda p: "a long answer that nobody reads"))
    async with engine:
        ctx = engine.context()
        ctx.user("talk")
        stream = ctx.stream(max_tokens=100)
        got = [await stream.__anext__() for _ in range(6)]
        await stream.aclose()
        assert "".join(got) == "a long" and ctx.last.finish_reason == "aborted"
        assert ctx.messages[-1] == {"role": "assistant", "content": "a long"}
        assert ctx.text.endswith("<start_of_turn>model\na long<end_of_turn>\n")
        ctx.user("again")  # the conversation continues cleanly
        assert ctx.text.endswith("a long<end_of_turn>\n<start_of_turn>user\nagain<end_of_turn>\n")


async def test_bad_forward_input_is_a_clear_error_and_hurts_no_one():
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill_tokens([10, 11, 12])
        await ctx.flush()
        with pytest.raises(ValueError, match="sum to 4"):
            await ctx.forward().input([13], masks=[[0, 3]]).execute()
        with pytest.raises(ValueError, match="outside this forward's 1 tokens"):
            await ctx.forward().input([13]).sample(1).execute()
        with pytest.raises(ValueError, match="positions must be >= 0"):
            await ctx.forward().input([13], positions=[-1]).execute()
        assert ctx.kv_len == 3 and engine.pool.n_used == 1
        assert len(await ctx.generate(max_tokens=2)) > 0


class CountingTemplate:
    """A template that rewrites its first line on every render (like templates that inject dates)."""

    stop_strings: list[str] = []

    def render(self, messages, add_generation_prompt=True, tools=None):
        body = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return f"[{len(messages)} messages]" + body + ("<model>" if add_generation_prompt else "")


async def test_a_template_that_rewrites_earlier_turns_is_refilled():
    driver = FakeDriver(DriverParams(page_size=4, n_pages=64, max_batch_tokens=64))
    engine = fake_engine(driver, chat_template=CountingTemplate())
    async with engine:
        ctx = engine.context()
        ctx.fill("preamble ")
        ctx.user("first question")
        await ctx.flush()
        ctx.user("second")
        assert ctx.text == "<bos>preamble [2 messages]<user>first question<user>second"
        await ctx.generate(max_tokens=3)
        assert ctx.text.startswith("<bos>preamble [3 messages]<user>first question<user>second<assistant>")
        ctx.truncate(len(TOK.encode("<bos>preamble ")))
        assert ctx.messages == [] and ctx.text == "<bos>preamble "


async def test_drop_pages_keeps_positions_and_frees_memory():
    engine, driver = make_engine()
    async with engine:
        ctx = engine.context()
        tokens = list(range(20, 34))  # 14 tokens: pages 0..2 full, tail of 2
        ctx.fill_tokens(tokens)
        await ctx.flush()
        used = engine.pool.n_used
        ctx.drop_pages([1, 2])
        assert ctx.kv_len == 6 and ctx.n_pages == 2 and engine.pool.n_used == used - 2
        out = await ctx.forward().input([40]).probe(0, logits=True).execute()
        seen = [(t, i) for i, t in enumerate(tokens) if not 4 <= i < 12] + [(40, 14)]
        np.testing.assert_array_equal(out.logits[0], driver.logits_for(seen))
        with pytest.raises(ValueError, match="not a full page"):
            ctx.drop_pages([2])


async def test_kv_computed_with_custom_positions_or_masks_is_never_shared():
    engine, driver = make_engine()
    async with engine:
        shifted = engine.context()
        await shifted.forward().input(list(range(10, 18)), positions=list(range(100, 108))).execute()
        masked = engine.context()
        await masked.forward().input([10] * 8, masks=[[0, i + 1, 7 - i] for i in range(8)]).execute()
        before = driver.stats.tokens
        plain = engine.context()
        plain.fill_tokens(list(range(10, 18)))
        await plain.flush()
        other = engine.context()
        other.fill_tokens([10] * 8)
        await other.flush()
        assert driver.stats.tokens - before == 16  # nothing was adopted from the shaped contexts


async def test_generation_reports_prompt_cached_tokens_and_top_logprobs():
    engine, driver = make_engine(scripted(lambda p: "abc"))
    async with engine:
        prompt = "a shared system prompt, long enough for pages " * 2 + MARK
        first = engine.context()
        first.fill(prompt)
        await first.generate(max_tokens=8, top_logprobs=3)
        gen = first.last
        assert gen.prompt_tokens == len(TOK.encode(prompt)) + 1  # + BOS
        assert gen.cached_tokens == 0  # nothing was computed before
        assert len(gen.top_logprobs) == len(gen.token_ids) == 3
        for token, logprob, top in zip(gen.token_ids, gen.logprobs, gen.top_logprobs):
            assert len(top) == 3 and top[0][0] == token  # the scripted token is the most probable
            assert top[0][1] == pytest.approx(logprob, abs=1e-5)
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)

        second = engine.context()  # the same prompt: its full pages come from the prefix cache
        second.fill(prompt)
        await second.generate(max_tokens=2)
        full_pages = (second.last.prompt_tokens - 1) // 4 * 4  # the last prompt token is always computed
        assert second.last.cached_tokens == full_pages > 0
        assert second.last.top_logprobs == []


async def test_engine_public_surface():
    engine, driver = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("hello")
        await ctx.flush()
        assert engine.pool.n_used == ctx.n_pages == 2
        assert engine.counters.batches == 1
        sub = engine.messages.subscribe("topic")
        assert engine.messages.broadcast("topic", 7) == 1 and await sub.get() == 7
        assert await engine.run_driver(driver.read_pages, ctx.page_ids) == driver.read_pages(ctx.page_ids)
        ctx.release()
        assert engine.pool.n_used == 0


async def test_positions_past_the_trained_context_are_refused_unless_the_program_allows_them():
    from pie_local.runtime import ContextLengthError

    engine, driver = make_engine(n_ctx_train=64)
    n_ctx = driver.info.n_ctx_train
    async with engine:
        ctx = engine.context()
        with pytest.raises(ContextLengthError, match=f"trained context of {n_ctx} tokens"):
            ctx.fill_tokens([7] * (n_ctx + 1))
        assert len(ctx) == 0  # nothing was added
        ctx.fill_tokens([7] * (n_ctx - 3))
        await ctx.generate(max_tokens=10)  # stops when the context is full, not with an error
        assert ctx.last.finish_reason == "length" and len(ctx.last.token_ids) == 3
        assert len(ctx) == n_ctx
        with pytest.raises(ContextLengthError):
            await ctx.forward().input([7], positions=[n_ctx + 5]).execute()
        ctx.max_position = None  # a program with its own policy (attention sink) may go on
        out = await ctx.forward().input([7], positions=[n_ctx + 5]).sample(0).execute()
        assert out.tokens.shape == (1,)
        assert ctx.fork1().max_position is None
