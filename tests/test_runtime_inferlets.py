"""Inferlet loading, argument parsing, messaging and child inferlets on FakeDriver."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams
from pie_local.runtime import Engine
from pie_local.runtime.inferlet import InferletError, Param, load_inferlet, parse_args
from runtime_helpers import fake_engine

PARAMS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "max_tokens": Param(int, default=16),
    "temperature": Param(float, default=0.0),
    "verbose": Param(bool, default=False),
    "mode": Param(str, default="a", choices=["a", "b"]),
}


def make_engine() -> Engine:
    driver = FakeDriver(DriverParams(page_size=4, n_pages=64, max_batch_tokens=64))
    return fake_engine(driver)


def test_parse_args_from_lists_and_dicts():
    args = parse_args(PARAMS, ["--prompt", "hi there", "--max-tokens=5", "--verbose", "--temperature", "0.5"])
    assert args == {"prompt": "hi there", "max_tokens": 5, "temperature": 0.5, "verbose": True, "mode": "a"}
    assert args.max_tokens == 5
    assert parse_args(PARAMS, {"prompt": "x", "verbose": "no"}).verbose is False
    assert parse_args(PARAMS, ["--prompt", "x", "--verbose", "--no-verbose"]).verbose is False


@pytest.mark.parametrize("argv, message", [
    ([], "missing required argument --prompt"),
    (["--prompt", "x", "--max-tokens", "many"], "--max-tokens expects int"),
    (["--prompt", "x", "--colour", "red"], "unknown argument --colour"),
    (["--prompt"], "--prompt needs a value"),
    (["prompt", "x"], "expected --key value"),
    (["--prompt", "x", "--mode", "c"], "must be one of a, b"),
])
def test_parse_args_errors_are_clear(argv, message):
    with pytest.raises(InferletError, match=message):
        parse_args(PARAMS, argv, "demo")


async def test_load_a_file_inferlet_and_run_it(tmp_path):
    path = tmp_path / "echo_twice.py"
    path.write_text(textwrap.dedent('''
        from pie_local.runtime.inferlet import Param
        NAME = "echo-twice"
        DESCRIPTION = "Says its word twice."
        PARAMETERS = {"word": Param(str, required=True, help="the word")}

        async def main(rt, args):
            ctx = rt.context()
            ctx.fill(args.word)
            await ctx.flush()
            rt.emit(args.word)
            rt.emit(args.word)
            return {"tokens": len(ctx)}
    '''))
    spec = load_inferlet(path)
    assert (spec.name, spec.description) == ("echo-twice", "Says its word twice.")
    assert "--word STR" in spec.usage()
    async with make_engine() as engine:
        handle = engine.launch(path, ["--word", "hey"])
        texts = [m.data async for m in handle.messages() if m.kind == "text"]
        assert texts == ["hey", "hey"]
        assert await handle.result() == {"tokens": 4}  # <bos> + 3 bytes
        with pytest.raises(InferletError, match="missing required argument --word"):
            engine.launch(path, [])


def test_load_errors(tmp_path):
    with pytest.raises(InferletError, match="no inferlet named 'no-such-thing'"):
        load_inferlet("no-such-thing")
    with pytest.raises(InferletError, match="not found"):
        load_inferlet(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("def main(rt, args): pass\n")
    with pytest.raises(InferletError, match="async def main"):
        load_inferlet(bad)
    broken = tmp_path / "broken.py"
    broken.write_text("import definitely_not_a_module\n")
    with pytest.raises(InferletError, match="cannot load inferlet"):
        load_inferlet(broken)


async def test_client_messages_both_ways():
    async def echo(rt, args):
        while (msg := await rt.receive()) != "bye":
            rt.send(msg.upper())
        return "done"

    async with make_engine() as engine:
        h = engine.launch(echo)
        await h.send("a")
        await h.send("b")
        await h.send("bye")
        assert [m.data async for m in h.messages()] == ["A", "B"]
        assert await h.result() == "done"


async def test_broadcast_subscribe_and_push_pull_between_inferlets():
    async def listener(rt, args):
        sub = rt.subscribe("news")
        rt.push("ready", 1)
        return [await sub.get(), await sub.get()]

    async def worker(rt, args):
        return await rt.pull("jobs") * 10

    async def boss(rt, args):
        listeners = [rt.spawn(listener) for _ in range(2)]
        for _ in listeners:
            await rt.pull("ready")
        assert rt.broadcast("news", "one") == 2
        rt.broadcast("news", "two")
        workers = [rt.spawn(worker) for _ in range(3)]
        for job in (1, 2, 3):
            rt.push("jobs", job)
        return [await h.result() for h in listeners], sorted([await h.result() for h in workers])

    async with make_engine() as engine:
        heard, done = await engine.run(boss)
        assert heard == [["one", "two"], ["one", "two"]] and done == [10, 20, 30]


async def test_launch_child_and_children_die_with_their_parent():
    async def child(rt, args):
        ctx = rt.context()
        ctx.fill(args["text"])
        return await ctx.generate(max_tokens=4)

    child.PARAMETERS = {"text": Param(str, required=True)}

    async def sleeper(rt, args):
        ctx = rt.context()
        ctx.fill("hold pages")
        await ctx.flush()
        await asyncio.sleep(3600)

    async def parent(rt, args):
        rt.spawn(sleeper)
        first = await rt.launch(child, {"text": "x"})
        raise RuntimeError(f"parent fails after child said {len(first)} chars")

    async with make_engine() as engine:
        h = engine.launch(parent)
        with pytest.raises(RuntimeError, match="parent fails"):
            await h.result()
        for _ in range(100):  # the cancelled child finishes on a later loop turn
            if all(x.done() for x in engine.inferlets()):
                break
            await asyncio.sleep(0.01)
        states = sorted((x.name, x.state) for x in engine.inferlets())
        assert states == [("child", "done"), ("parent", "failed"), ("sleeper", "cancelled")]
        assert engine.pool.n_used == 0
        stats = engine.stats()
        assert {i.name for i in stats.inferlets} == {"child", "parent", "sleeper"}
        assert stats.pages_used == 0 and stats.tokens_total > 0 and stats.batches > 0


async def test_load_a_package_inferlet_with_a_helper_module(tmp_path):
    pkg = tmp_path / "shouter"
    pkg.mkdir()
    (pkg / "helpers.py").write_text("def shout(s):\n    return s.upper() + '!'\n")
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from pie_local.runtime.inferlet import Param
        from .helpers import shout
        NAME = "shouter"
        PARAMETERS = {"word": Param(str, default="hey")}

        async def main(rt, args):
            return shout(args.word)
    '''))
    async with make_engine() as engine:
        assert await engine.run(pkg, ["--word", "hi"]) == "HI!"
        assert load_inferlet(pkg).name == "shouter"


async def test_watchdog_names_an_inferlet_that_blocks_the_event_loop(caplog):
    import logging
    import time

    async def sleeper(rt, args):
        ctx = rt.context()
        ctx.fill("about to block")
        await ctx.flush()
        time.sleep(1.6)  # blocking call inside async code: every inferlet stalls
        return "woke"

    async def polite(rt, args):
        return await rt.run_blocking(time.sleep, 1.6) or "slept off the loop"

    engine = make_engine()
    caplog.set_level(logging.WARNING, logger="pie_local.runtime")
    async with engine:
        assert await engine.run(polite) == "slept off the loop"
        assert engine.stats().stall is None  # run_blocking kept the loop turning
        handle = engine.launch(sleeper)
        assert await handle.result() == "woke"
        await asyncio.sleep(0.3)  # the heartbeat notices the loop turns again
        stall = engine.stats().stall
    assert stall is not None and f"inferlet 'sleeper' ({handle.id})" in stall and "test_runtime_inferlets.py" in stall
    assert any("blocked" in r.message and "sleeper" in r.message and "run_blocking" in r.message for r in caplog.records)
