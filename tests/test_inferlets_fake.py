"""Every standard inferlet on FakeDriver: the mechanics (forks, batching, masks, constraints, tool
calls in the KV, speculative == greedy), not the wisdom of a toy model."""

from __future__ import annotations

import json
import math

import pytest

from pie_local.driver.fake import FakeDriver, FakeTokenizer
from pie_local.driver.types import DriverParams
from pie_local.runtime.inferlet import InferletError, load_inferlet, stdlib_names
from runtime_helpers import fake_engine

STDLIB = ["attention-sink", "beam-search", "best-of-n", "chat", "classify", "draft-model", "json-output",
          "prefix-cache", "prompt-lookup", "react-agent", "reasoning", "text-completion", "tree-of-thought",
          "triggered-call", "windowed-attention"]


class RecordingDriver(FakeDriver):
    """FakeDriver that keeps every batch it ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches = []

    def forward(self, batch):
        self.batches.append(batch)
        return super().forward(batch)


def make_driver(**kwargs) -> RecordingDriver:
    return RecordingDriver(DriverParams(page_size=4, n_pages=2048, max_batch_tokens=256), **kwargs)


@pytest.fixture
async def engine():
    async with fake_engine(make_driver()) as e:
        yield e


async def run_collect(engine, name, args):
    handle = engine.launch(name, args)
    texts, data = [], []
    async for msg in handle.messages():
        (texts if msg.kind == "text" else data).append(msg.data)
    return await handle.result(), "".join(texts), data, handle


async def greedy_tokens(engine, prompt: str, n: int) -> list[int]:
    ctx = engine.context()
    ctx.fill(prompt)
    await ctx.generate(max_tokens=n)
    ids = list(ctx.last.token_ids)
    ctx.release()
    return ids


def test_stdlib_is_complete_and_declared():
    assert stdlib_names() == STDLIB
    for name in STDLIB:
        spec = load_inferlet(name)
        assert spec.name == name and spec.description and spec.parameters
    with pytest.raises(InferletError, match="no inferlet named 'nope'"):
        load_inferlet("nope")


# ---------------------------------------------------------------------------- plain generation

async def test_text_completion_is_greedy_and_streams(engine):
    result, streamed, _, _ = await run_collect(engine, "text-completion", ["--prompt", "Hello", "--max-tokens", "12"])
    assert streamed == result
    ids = await greedy_tokens(engine, "Hello", 12)
    assert result == FakeTokenizer().decode(ids, special=False)


async def test_text_completion_seeds(engine):
    args = {"prompt": "Hi", "max_tokens": 16, "temperature": 1.0}
    a = await engine.run("text-completion", {**args, "seed": 1})
    b = await engine.run("text-completion", {**args, "seed": 1})
    c = await engine.run("text-completion", {**args, "seed": 2})
    assert a == b and a != c


async def test_text_completion_rejects_bad_args(engine):
    with pytest.raises(InferletError, match="missing required argument --prompt"):
        engine.launch("text-completion", [])
    with pytest.raises(InferletError, match="--max-tokens expects int"):
        engine.launch("text-completion", ["--prompt", "x", "--max-tokens", "many"])


async def test_classify_picks_the_label_with_the_best_score(engine):
    labels = [" yes", " no", " maybe not"]
    result, streamed, _, _ = await run_collect(engine, "classify", {"prompt": "Is it?", "labels": labels})
    scores = []
    for label in labels:
        ctx = engine.context()
        ctx.fill("Is it?")
        scores.append(await ctx.score(label))
        ctx.release()
    best = max(range(3), key=lambda i: scores[i].mean)
    assert result["label"] == labels[best] == streamed and result["index"] == best
    assert [s["mean_logprob"] for s in result["scores"]] == pytest.approx([s.mean for s in scores], abs=1e-4)
    by_total = await engine.run("classify", {"prompt": "Is it?", "labels": labels, "normalize": False})
    assert by_total["index"] == max(range(3), key=lambda i: scores[i].total)
    assert engine.pool.n_used == 0  # the inferlet's context went back at the end of its `async with`


async def test_triggered_call_is_free_until_the_tag_then_a_valid_call():
    say = {"Q: What is 6 * 7?\nA:": ' Sure. <tool_call>{"name":"calculator","arguments":{"expression":"6*7"}} ok'}
    async with fake_engine(make_driver(next_token=scripted(say))) as engine:
        result = await engine.run("triggered-call", {"prompt": "What is 6 * 7?", "max_tokens": 200})
        assert result["text"] == " Sure. " and result["result"] == "42"
        assert result["call"] == {"name": "calculator", "arguments": {"expression": "6*7"}}
        # the keys were forced, not sampled; the call ended the generation (" ok" never came)
        assert result["forced_tokens"] >= len('{"name":"calculator","arguments":{"expression":"')
        no_call = await engine.run("triggered-call", {"prompt": "Hi?", "max_tokens": 5})
        assert no_call["call"] is None and no_call["finish_reason"] == "length"


async def test_reasoning_is_cut_at_its_budget_and_the_answer_follows(engine):
    result, streamed, _, _ = await run_collect(engine, "reasoning", {"prompt": "Why?", "budget": 7,
                                                                       "max_tokens": 20})
    assert result["reasoning_tokens"] == 7 + len("</think>")  # the fake model never closes it itself
    assert 0 < len(result["reasoning"]) <= 7 and streamed == result["answer"]  # 7 random bytes
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
                         "required": ["n"], "additionalProperties": False})
    constrained = await engine.run("reasoning", {"prompt": "Why?", "budget": 3, "answer_schema": schema})
    assert set(json.loads(constrained["answer"])) == {"n"} and constrained["finish_reason"] == "stop"


def scripted(replies: dict[str, str], tok=FakeTokenizer()):
    """A next-token rule: after the last occurrence of a trigger text, spell out its reply."""

    def rule(visible: list[int]):
        text = tok.decode(visible)
        best = None
        for trigger, reply in replies.items():
            at = text.rfind(trigger)
            if at >= 0 and (best is None or at > best[0]):
                best = (at, trigger, reply)
        if best is None:
            return None
        at, trigger, reply = best
        said = text[at + len(trigger):]
        if reply.startswith(said) and len(said) < len(reply):
            return tok.encode(reply[len(said)])[0]
        if said == reply:
            return tok.token_id("<end_of_turn>")
        return None

    return rule


async def test_chat_one_message_and_interactive():
    driver = make_driver(next_token=scripted({"<start_of_turn>model\n": "hi there"}))
    async with fake_engine(driver) as engine:
        assert await engine.run("chat", {"message": "hello", "system": "be brief"}) == "hi there"
        handle = engine.launch("chat", {})
        events = []

        async def turn(text):
            await handle.send(text)
            reply = ""
            async for msg in handle.messages():
                if msg.kind == "text":
                    reply += msg.data
                else:
                    events.append(msg.data)
                    return reply

        assert await turn("one") == "hi there"
        assert await turn("two") == "hi there"
        assert events[1]["tokens"] > events[0]["tokens"]  # the second turn continued the same KV
        await handle.send("/exit")
        messages = await handle.result()
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert messages[2]["content"] == "two"


# ---------------------------------------------------------------------------- forks and search

async def test_best_of_n_forks_share_the_prompt():
    driver = make_driver()
    async with fake_engine(driver) as engine:
        prompt = "Question: what is two plus two? Answer:"
        result = await engine.run("best-of-n", {"prompt": prompt, "n": 4, "max_tokens": 6})
    cands = result["candidates"]
    assert len(cands) == 4 and len({c["text"] for c in cands}) > 1  # the seeds differ
    # the prompt (all but its last token) was computed once; each branch then forwards one token per step
    n_prompt = len(FakeTokenizer().encode(prompt)) + 1  # + BOS
    steps = sum(c["tokens"] + (c["finish_reason"] == "stop") for c in cands)
    assert driver.stats.tokens == (n_prompt - 1) + steps
    assert max(b["n_requests"] for b in driver.stats.batches) == 4  # branches decoded together
    votes = result["votes"]
    assert votes[result["answer"]] == max(votes.values())
    for c in cands:
        assert c["mean_logprob"] == pytest.approx(c["logprob"] / max(1, c["tokens"])) or c["tokens"] == 0


async def test_best_of_n_vote_picks_the_majority_answer():
    # the toy model always answers 7 after "A:" and then stops: every branch votes "7"
    driver = make_driver(next_token=scripted({"A:": " 7"}))
    async with fake_engine(driver) as engine:
        result = await engine.run("best-of-n", {"prompt": "Q: 3+4? A:", "n": 3, "max_tokens": 8,
                                                "answer_regex": r"\d+"})
    assert result["answer"] == "7" and result["votes"] == {"7": 3}


async def _logprob_of(engine, prompt: str, tokens: list[int]) -> float:
    """Teacher-forced log-probability of ``tokens`` after ``prompt``, from one probe pass."""
    ctx = engine.context()
    ctx.fill(prompt)
    prompt_ids = ctx.token_ids
    ctx.truncate(len(prompt_ids) - 1)
    seq = [prompt_ids[-1]] + tokens
    out = await ctx.forward().input(seq).probe(list(range(len(tokens))), top_k=engine.info.n_vocab).execute()
    ctx.release()
    total = 0.0
    for i, t in enumerate(tokens):
        ids, probs = list(out.top_ids[i]), out.top_probs[i]
        total += math.log(probs[ids.index(t)])
    return total


async def test_beam_search_width_one_is_greedy(engine):
    result = await engine.run("beam-search", {"prompt": "Once", "beam_width": 1, "max_tokens": 10})
    greedy = await greedy_tokens(engine, "Once", 10)
    assert result["token_ids"] == greedy[: len(result["token_ids"])]
    assert result["forks"] == 0


async def test_beam_search_forks_and_scores_its_beams(engine):
    result = await engine.run("beam-search", {"prompt": "Once", "beam_width": 3, "max_tokens": 6})
    assert result["forks"] > 0 and len(result["beams"]) >= 3
    assert result["logprob"] == pytest.approx(await _logprob_of(engine, "Once", result["token_ids"]), abs=1e-4)
    assert engine.stats().pages_used == 0  # every beam context was released


async def test_tree_of_thought_expands_depth_times_breadth():
    driver = make_driver()
    async with fake_engine(driver) as engine:
        result = await engine.run("tree-of-thought", {"prompt": "Plan:", "depth": 2, "breadth": 3,
                                                      "thought_tokens": 5})
    assert result["nodes"] == 3 + 3 * 3
    assert len(result["thoughts"]) == 2
    assert max(b["n_requests"] for b in driver.stats.batches) == 9  # the 9 level-2 children batched
    level2 = [n for n in result["tree"] if n["level"] == 2]
    assert result["score"] == max(n["score"] for n in level2)


# ---------------------------------------------------------------------------- constraints and tools

async def test_json_output_always_validates(engine):
    jsonschema = pytest.importorskip("jsonschema")
    from pie_local.inferlets.json_output import DEFAULT_SCHEMA

    for seed in range(4):
        value = await engine.run("json-output", {"prompt": "Ada, 36", "temperature": 1.0, "seed": seed})
        jsonschema.validate(value, DEFAULT_SCHEMA)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    value = await engine.run("json-output", {"prompt": "x", "schema": json.dumps(schema), "temperature": 1.0})
    assert isinstance(value["ok"], bool)


async def test_json_output_cut_off_is_an_error(engine):
    with pytest.raises(ValueError, match="cut off after 3 tokens"):
        await engine.run("json-output", {"prompt": "x", "max_tokens": 3})
    with pytest.raises(ValueError, match="--schema is not valid JSON"):
        await engine.run("json-output", {"prompt": "x", "schema": "{nope"})


async def test_json_output_options_and_what_was_relaxed(engine, tmp_path):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2,
                                                        "uniqueItems": True}},
              "required": ["tags"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    value, streamed, data, _ = await run_collect(engine, "json-output", {"prompt": "x", "schema": str(path),
                                                                        "temperature": 1.0, "seed": 0})
    assert set(value) == {"tags"} and streamed.startswith('{"tags":[')
    [relaxed] = data
    assert relaxed["event"] == "relaxed" and relaxed["keywords"] == ["uniqueItems"] and relaxed["warnings"]
    with pytest.raises(ValueError, match="uniqueItems"):
        await engine.run("json-output", {"prompt": "x", "schema": f"@{path}", "lenient": False})
    _, spaced, _, _ = await run_collect(engine, "json-output", {"prompt": "x", "schema": str(path), "seed": 0,
                                                               "temperature": 1.0, "key_separator": ": "})
    assert spaced.startswith('{"tags": [')


CALL = '{"name":"calculator","arguments":{"expression":"17*23"}}'
FINAL = '{"name":"final_answer","arguments":{"answer":"391"}}'


def agent_rule():
    tok = FakeTokenizer()
    call_rule = scripted({"Action: ": CALL})
    final_rule = scripted({"Action: ": FINAL})
    thought_rule = scripted({"Thought:": " compute\n"})

    def rule(visible):
        text = tok.decode(visible)
        if text.rfind("Thought:") > text.rfind("Action: "):
            return thought_rule(visible)
        asked = text.count("Question:") and text[text.rfind("Question:"):].count("Action: ")
        return (call_rule if asked <= 1 else final_rule)(visible)

    return rule


async def test_react_agent_calls_the_calculator_and_keeps_the_result_in_kv():
    driver = make_driver(next_token=agent_rule())
    async with fake_engine(driver) as engine:
        result, streamed, data, _ = await run_collect(engine, "react-agent",
                                                      {"prompt": "What is 17*23?", "tools": "calculator"})
    assert data == [{"event": "tool_call", "name": "calculator", "arguments": {"expression": "17*23"},
                     "result": "391"}]
    assert result["calls"] == 1 and result["answer"] == "391" and streamed == "391"
    assert result["steps"][0]["thought"] == "compute"
    # the observation is in the same context, right after the constrained call
    assert f"Action: {CALL}\nObservation: 391\n" in result["transcript"]
    assert result["transcript"].rstrip().endswith(f"Action: {FINAL}")


async def test_react_agent_constrains_even_a_random_model(engine):
    result = await engine.run("react-agent", {"prompt": "What is 2+2?", "max_steps": 2, "thought_tokens": 3,
                                              "temperature": 1.0, "seed": 3})
    assert result["answer"] is not None or result["calls"] >= 1
    for step in result["steps"]:
        action = json.loads(step["action"])  # every action parsed
        assert action["name"] in ("calculator", "lookup_file", "final_answer")
    assert json.loads(result["steps"][0]["action"])["name"] != "final_answer"  # min_calls=1


def test_calculator_and_file_lookup(tmp_path):
    from pie_local.inferlets.react_agent import calculator, make_lookup_file

    assert calculator("17 * 23") == "391"
    assert calculator("2 ** 10 - sqrt(16)") == "1020"
    assert calculator("7 / 2") == "3.5"
    for bad in ("__import__('os')", "9 ** 999", "open('x')", "1 +"):
        with pytest.raises(ValueError):
            calculator(bad)
    (tmp_path / "notes.txt").write_text("the code is 42")
    lookup = make_lookup_file(tmp_path)
    assert lookup("notes.txt") == "the code is 42"
    with pytest.raises(ValueError, match="outside the files directory"):
        lookup("../secret")
    with pytest.raises(ValueError, match="files: notes.txt"):
        lookup("missing.txt")


# ---------------------------------------------------------------------------- masks and pages

def _masked_batches(driver: RecordingDriver) -> int:
    return sum(b.mask_runs is not None for b in driver.batches)


@pytest.mark.parametrize("name,extra", [("attention-sink", {"sink": 3}), ("windowed-attention", {})])
async def test_masked_attention_bounds_pages_and_masks_equal_dropping(name, extra):
    args = {"prompt": "The fox", "max_tokens": 40, "window": 8, **extra}
    outputs = {}
    for drop in (True, False):
        driver = make_driver()
        async with fake_engine(driver) as engine:
            outputs[drop] = await engine.run(name, {**args, "drop_pages": drop})
            plain = await greedy_tokens(engine, args["prompt"], 40)
        out = outputs[drop]
        steps = len(out["token_ids"]) + (len(out["token_ids"]) < 40)  # + the step that drew EOS
        assert _masked_batches(driver) == steps  # one masked pass per generated token
    kept, masked = outputs[True], outputs[False]
    assert kept["token_ids"] == masked["token_ids"]  # hidden KV and dropped KV are the same to the model
    assert kept["pages_dropped"] > 0 and masked["pages_dropped"] == 0
    sink_pages = -(-extra.get("sink", 0) // 4)
    assert kept["max_pages"] <= sink_pages + 8 // 4 + 2  # sink + window + partial pages, however long
    assert masked["kv_tokens"] > kept["kv_tokens"]
    assert kept["token_ids"] != plain  # the mask changed what the model saw


def test_attention_masks():
    from pie_local.inferlets.attention_sink import droppable_pages, visible_mask

    # positions 0..9, newest 9: sink 2 + window 3 -> visible 0,1 and 7,8,9
    assert visible_mask(list(range(10)), sink=2, window=3) == [0, 2, 5, 3]
    assert visible_mask(list(range(10)), sink=0, window=3) == [7, 3]
    # pages of 4: page 1 (4..7) is invisible from position 12 on with window 4; page 0 holds sinks
    assert droppable_pages(list(range(12)), 4, sink=2, window=4, next_position=12) == [1]


# ---------------------------------------------------------------------------- speculative decoding

async def test_prompt_lookup_equals_greedy(engine):
    prompt = "abc abc abc abc"
    result = await engine.run("prompt-lookup", {"prompt": prompt, "max_tokens": 24})
    assert result["token_ids"] == await greedy_tokens(engine, prompt, 24)
    assert result["drafted"] > 0


async def test_prompt_lookup_accepts_drafts_of_a_repeating_model():
    tok = FakeTokenizer()
    text = "one two three four five six seven eight nine ten " * 2

    def repeat(visible):  # continues the text above, as a model quoting its prompt would
        seen = tok.decode(visible[1:])
        return tok.encode(text[len(seen) % len(text)])[0] if seen else None

    async with fake_engine(make_driver(next_token=repeat)) as engine:
        result = await engine.run("prompt-lookup", {"prompt": text, "max_tokens": 40})
        greedy = await greedy_tokens(engine, text, 40)
    assert result["token_ids"] == greedy
    assert result["accepted"] >= 30
    assert result["forward_passes"] < 12  # 40 tokens in far fewer passes


async def test_draft_model_needs_a_model_file_to_load(engine):
    # the draft model runs in an Engine of its own, loaded from a file; tests/test_generation_real.py runs it
    with pytest.raises(ValueError, match="--draft-model is needed"):
        await engine.run("draft-model", {"prompt": "abc"})


async def test_prompt_lookup_samples_too(engine):
    args = {"prompt": "abc abc abc abc", "max_tokens": 16, "temperature": 0.8, "seed": 3}
    a, b = await engine.run("prompt-lookup", args), await engine.run("prompt-lookup", args)
    assert a == b and len(a["token_ids"]) == 16  # seeded: reproducible


def test_find_draft():
    from pie_local.inferlets.prompt_lookup import find_draft

    assert find_draft([1, 2, 3, 9, 1, 2, 3], 3, 2) == [9, 1]
    assert find_draft([5, 6, 7, 6], 3, 4) == [7, 6]  # falls back to a 1-gram
    assert find_draft([1, 2, 3], 3, 4) == []


# ---------------------------------------------------------------------------- snapshots

async def test_prefix_cache_saves_then_continues_without_prefill():
    driver = make_driver()
    prefix = "A long shared document. " * 8
    async with fake_engine(driver) as engine:
        first = await engine.run("prefix-cache", {"name": "doc", "prefix": prefix, "prompt": " Q:", "max_tokens": 8})
    assert first["reused"] is False
    before = driver.stats.tokens
    driver2 = make_driver()
    driver2._kv_tok[:], driver2._kv_pos[:] = -1, -1  # a fresh driver: nothing cached
    async with fake_engine(driver2) as engine:
        second = await engine.run("prefix-cache", {"name": "doc", "prompt": " Q:", "max_tokens": 8})
    assert second["reused"] is True and second["prefix_tokens"] == first["prefix_tokens"]
    assert second["text"] == first["text"]
    # only the prompt's tokens (plus the steps) went through the model, not the prefix
    assert driver2.stats.tokens <= len(" Q:") + 8 + 1 < before


async def test_prefix_cache_missing_snapshot_is_a_clear_error(engine):
    from pie_local.runtime.snapshots import SnapshotError

    with pytest.raises(SnapshotError, match="give --prefix to create it"):
        await engine.run("prefix-cache", {"name": "nothing-here"})
