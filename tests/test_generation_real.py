"""The generation API on the real driver and the starter model (Gemma 3 270M base, Q4_K_M): the
mechanics of scoring, forced tokens, token healing, triggered grammars, reasoning budgets and
speculation on a real 262k vocabulary (not the model's wisdom)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.real_driver, pytest.mark.slow]


def _driver_built() -> bool:
    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:
        return False
    return True


if not _driver_built():
    pytestmark.append(pytest.mark.skip(reason="the native driver is not built"))


def engine_for(path, **kw):
    from pie_local.driver.types import DriverParams
    from pie_local.runtime import Engine, EngineConfig

    return Engine(str(path), EngineConfig(driver=DriverParams(n_pages=128, n_threads=2, **kw)))


@pytest.fixture
async def engine(starter_gguf):
    async with engine_for(starter_gguf) as e:
        yield e


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


# ---- scoring ------------------------------------------------------------------------------------

async def test_score_matches_the_logits_of_each_position(engine):
    ctx = engine.context()
    ctx.fill("The capital of France is")
    await ctx.flush()  # the prompt computed apart, as below (a different batch shape rounds differently)
    result = await ctx.score(" Paris, the city of light")
    ids = result.token_ids
    # the same positions probed with their full logits, in a fork
    probe = ctx.fork1()
    last = probe.token_ids[-1]
    probe.truncate(len(probe) - 1)
    out = await probe.forward().input([last] + ids[:-1]).probe(list(range(len(ids))), logits=True).execute()
    want = [float(log_softmax(out.logits[i])[t]) for i, t in enumerate(ids)]
    assert result.logprobs == pytest.approx(want, abs=2e-3)
    assert ctx.token_ids[-1] == last and len(ctx) == len(probe) + 1 - len(ids)


async def test_select_prefers_the_likely_continuation(engine):
    ctx = engine.context()
    ctx.fill("The capital of France is")
    chosen = await ctx.select([" a banana", " Paris", " the moon"])
    assert chosen.option == " Paris" and chosen.index == 1
    assert chosen.best.mean > max(s.mean for i, s in enumerate(chosen.scores) if i != 1)
    assert ctx.text.endswith("The capital of France is Paris")


async def test_constrained_logprobs_are_raw_and_renormalised_and_top_k_is_masked(engine):
    from pie_local.runtime import SamplingParams
    from pie_local.runtime.constraints import Regex, allowed_tokens

    regex = Regex(" ?(yes|no|maybe)")
    ctx = engine.context()
    ctx.fill("Question: is the sky green? Answer (yes or no):")
    result = await ctx.generate(SamplingParams(temperature=1.0, seed=2), max_tokens=8, constrain=regex,
                                top_logprobs=3)
    assert result.strip() in ("yes", "no", "maybe")
    state = regex.bind(engine.tokenizer)  # replays the generation to know what was allowed at each step
    for token, raw, renorm, top in zip(result.token_ids, result.logprobs, result.allowed_logprobs,
                                       result.top_logprobs):
        allowed = set(allowed_tokens(state.mask()).tolist())
        assert {t for t, _ in top} <= allowed and top  # the masked top-k, not the model's favourites
        assert renorm >= raw - 1e-6 and renorm <= 0.0
        assert sum(np.exp(lp) for _, lp in top) <= 1.0 + 1e-6
        state.advance(token)


# ---- forced tokens in one pass -------------------------------------------------------------------

async def test_json_keys_the_schema_forces_go_into_the_kv_in_one_pass(engine):
    import json

    import jsonschema

    from pie_local.bench.generation import LONG_KEY_SCHEMA, json_prompt
    from pie_local.runtime.constraints import JsonSchema

    results = {}
    for fast_forward in (False, True):
        ctx = engine.context()
        ctx.fill(json_prompt(LONG_KEY_SCHEMA, str(fast_forward)))
        results[fast_forward] = await ctx.generate(max_tokens=200, constrain=JsonSchema(LONG_KEY_SCHEMA),
                                                   fast_forward=fast_forward)
        jsonschema.validate(json.loads(results[fast_forward]), LONG_KEY_SCHEMA)
        assert ctx.text.endswith(results[fast_forward])
    slow, fast = results[False], results[True]
    assert slow.forward_passes == len(slow.token_ids) and slow.forced_tokens == 0
    # every key is forced: the real tokenizer's tokens of 180 bytes of keys take no pass of their own
    assert fast.forced_tokens >= 30 and fast.forward_passes + fast.forced_tokens == len(fast.token_ids)
    assert fast.forward_passes * 3 < len(fast.token_ids)


# ---- token healing -------------------------------------------------------------------------------

async def test_token_healing_spans_the_prompt_boundary(engine):
    tok = engine.tokenizer
    prompt = "The project's homepage is at https:"
    assert [tok.piece(t) for t in tok.encode(prompt)[-2:]] == [b" https", b":"]  # the prompt stops mid-token
    text = await engine.run("text-completion", {"prompt": prompt, "max_tokens": 8, "heal": True})
    ctx = engine.context()
    ctx.fill(prompt)
    healed = await ctx.generate(max_tokens=8, heal=True)
    assert healed == text
    first = tok.piece(healed.token_ids[0])
    assert first.startswith(b":") and len(first) > 1  # one token covering ":" and more, e.g. "://"
    assert tok.decode(healed.token_ids).startswith(":") and tok.decode(healed.token_ids)[1:] == healed
    assert ctx.text == "<bos>" + prompt + healed


# ---- grammar on a trigger ------------------------------------------------------------------------

async def test_triggered_call_after_free_prose(engine):
    result = await engine.run("triggered-call", {"prompt": "What is 17 * 23?"})
    assert result["call"] == {"name": "calculator", "arguments": {"expression": "17 * 23"}}
    assert result["result"] == "391" and result["finish_reason"] == "stop"
    assert "<tool_call>" not in result["text"] and result["forced_tokens"] > 0


async def test_a_trigger_inside_a_token_and_the_free_text_before_it(engine):
    from pie_local.runtime.constraints import Regex, Triggered

    ctx = engine.context()
    ctx.fill("Shopping list: apples, bread, milk")
    # after the first comma of the output, only " <word>." may follow: the model's next token after
    # the comma may hold both, as llguidance matches the trigger on bytes
    text = await ctx.generate(max_tokens=40, constrain=Triggered(",", Regex(" [a-z]+\\.")))
    before, comma, after = text.partition(",")
    assert comma and text.finish_reason == "stop"
    import re

    assert re.fullmatch(r" [a-z]+\.", after), after


# ---- reasoning budget ----------------------------------------------------------------------------

async def test_reasoning_budget_closes_the_block_then_answers(engine):
    import json

    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    result = await engine.run("reasoning", {"prompt": "Question: What is 12 + 30? Think, then answer.",
                                            "budget": 12, "max_tokens": 60, "answer_schema": json.dumps(schema)})
    close_tokens = len(engine.tokenizer.encode("</think>"))
    assert result["reasoning_tokens"] <= 12 + close_tokens and result["reasoning"]
    assert isinstance(json.loads(result["answer"])["answer"], int) and result["finish_reason"] == "stop"
    ctx = engine.context()
    ctx.fill("Question: Why is the sky blue?\n<think>\n")
    answer = await ctx.generate(max_tokens=30, reasoning=8)
    assert answer.reasoning_tokens <= 8 + close_tokens and "</think>" in ctx.text
    assert ctx.text.endswith(answer) and answer.reasoning in ctx.text and "</think>" not in answer


# ---- speculation -----------------------------------------------------------------------------------

async def test_the_model_as_its_own_draft_model_reproduces_greedy(engine):
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    result = await engine.run("draft-model", {"prompt": prompt, "max_tokens": 24, "draft": 4})
    greedy = await engine.run("text-completion", {"prompt": prompt, "max_tokens": 24})
    assert result["text"] == greedy
    # the same model drafts what it will say: (nearly) every draft is kept, in a pass per 5 tokens
    assert result["accepted"] >= 0.9 * result["drafted"] > 0
    assert result["forward_passes"] <= len(result["token_ids"]) // 3 + 2
    stats = engine.stats()
    assert stats.drafted_tokens == result["drafted"] and stats.accepted_tokens == result["accepted"]


async def test_speculative_sampling_with_the_ngram_drafter(engine):
    from pie_local.runtime import NgramDrafter, SamplingParams

    prompt = "apples, bread, milk, eggs, butter. Again: apples, bread, milk,"
    outs = []
    for _ in range(2):
        ctx = engine.context()
        ctx.fill(prompt)
        outs.append(await ctx.generate(SamplingParams(temperature=0.7, top_p=0.9, seed=11), max_tokens=24,
                                       speculator=NgramDrafter(), draft_tokens=6))
        assert ctx.text == "<bos>" + prompt + outs[-1]
    assert outs[0].token_ids == outs[1].token_ids and len(outs[0].token_ids) == 24  # seeded: reproducible
    assert outs[0].drafted_tokens > 0 and outs[0].forward_passes < 24
