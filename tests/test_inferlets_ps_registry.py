"""`pie-local ps` bookkeeping: run files published per engine process, stale ones pruned."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pie_local.runtime import ps_registry
from runtime_helpers import fake_engine
from package_env import package_env


@dataclass
class _Stats:
    inferlets: list = field(default_factory=list)
    pages_used: int = 3


class _Engine:
    model_name = "toy"

    def __init__(self) -> None:
        self.rows = [{"id": 1, "name": "text-completion", "state": "running", "tokens": 5, "pages": 1},
                     {"id": 2, "name": "chat", "state": "done", "tokens": 9, "pages": 0}]

    def stats(self) -> _Stats:
        return _Stats(inferlets=list(self.rows))


def test_publish_and_read_back():
    ps_registry.publish(ps_registry.engine_snapshot(_Engine()))
    (entry,) = ps_registry.read_all()
    assert entry["pid"] == os.getpid()
    assert entry["model"] == "toy"
    assert [row["name"] for row in entry["inferlets"]] == ["text-completion"]  # finished ones are left out
    assert entry["stats"] == {"pages_used": 3}
    ps_registry.unpublish()
    assert ps_registry.read_all() == []


def test_dead_pid_and_stale_files_are_pruned():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ps_registry.publish({"pid": dead.pid, "updated_at": time.time(), "inferlets": []}, pid=dead.pid)
    # a live pid (ours) whose file stopped being refreshed long ago
    ps_registry.publish({"pid": os.getpid(), "updated_at": time.time() - 3600, "inferlets": []})
    (ps_registry.run_dir() / "garbage.json").write_text("{")
    assert ps_registry.read_all() == []
    assert list(ps_registry.run_dir().iterdir()) == []


async def test_publisher_refreshes_and_removes_its_file():
    engine = _Engine()
    publisher = ps_registry.PsPublisher(engine, interval=0.01)
    publisher.start()
    await asyncio.sleep(0.05)
    assert ps_registry.read_all()[0]["inferlets"][0]["tokens"] == 5
    engine.rows[0]["tokens"] = 9
    await asyncio.sleep(0.05)
    assert ps_registry.read_all()[0]["inferlets"][0]["tokens"] == 9
    await publisher.stop()
    assert ps_registry.read_all() == []


async def test_engines_of_one_process_have_a_file_each():
    """A server holds one engine per loaded model: each is listed, and one stopping leaves the others."""
    first, second = _Engine(), _Engine()
    second.model_name = "other"
    a = ps_registry.PsPublisher(first, interval=0.01)
    b = ps_registry.PsPublisher(second, interval=0.01)
    a.start()
    b.start()
    await asyncio.sleep(0.05)
    entries = ps_registry.read_all()
    assert [(e["pid"], e["model"]) for e in entries] == [(os.getpid(), "toy"), (os.getpid(), "other")]
    assert len(list(ps_registry.run_dir().glob("*.json"))) == 2
    await a.stop()
    assert [e["model"] for e in ps_registry.read_all()] == ["other"]
    await asyncio.sleep(0.05)  # b keeps refreshing its own file, never a's
    assert [e["model"] for e in ps_registry.read_all()] == ["other"]
    await b.stop()
    assert ps_registry.read_all() == []


def test_ps_cli_lists_other_processes(capsys):
    import argparse

    from pie_local.cli import ps

    def main(argv):
        parser = argparse.ArgumentParser()
        ps.add_arguments(parser)
        return ps.run(parser.parse_args(argv[1:]))

    assert main(["ps"]) == 0
    assert "no pie-local engine is running" in capsys.readouterr().out
    ps_registry.publish(ps_registry.engine_snapshot(_Engine()))
    assert main(["ps"]) == 0
    out = capsys.readouterr().out
    assert "text-completion" in out and str(os.getpid()) in out and "running" in out
    assert main(["ps", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["engines"][0]["inferlets"][0]["tokens"] == 5
    assert data["runs"][0]["tokens"] == 5 and data["runs"][0]["inferlet"] == "text-completion"
    assert data["server"] is None  # no pie-local server runs


async def test_ps_sees_an_inferlet_running_in_another_process(tmp_path, isolated_home):
    """A child process runs an engine with a blocked inferlet; this process lists it (the engine
    publishes it within a second)."""
    script = tmp_path / "engine_proc.py"
    script.write_text(
        "import asyncio, sys\n"
        "from pie_local.driver.fake import FakeChatTemplate, FakeDriver\n"
        "from pie_local.runtime.engine import Engine\n"
        "async def waiter(rt, args):\n"
        "    ctx = rt.context(); ctx.fill('hello'); await ctx.flush()\n"
        "    await rt.receive()\n"
        "async def main():\n"
        "    driver = FakeDriver()\n"
        "    async with Engine(driver=driver, tokenizer=driver.tokenizer, chat_template=FakeChatTemplate()) as engine:\n"
        "        handle = engine.launch(waiter)\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)\n"
        "        await handle.send('stop'); await handle.result()\n"
        "asyncio.run(main())\n"
    )
    env = package_env(PIE_LOCAL_HOME=str(isolated_home))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(100):
            entries = ps_registry.read_all()
            if entries and entries[0]["inferlets"] and entries[0]["inferlets"][0]["pages"] > 0:
                break
            await asyncio.sleep(0.05)
        (entry,) = entries
        assert entry["pid"] == proc.pid
        (row,) = entry["inferlets"]
        assert row["name"] == "waiter" and row["state"] == "running" and row["tokens"] == 6
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ps_registry.read_all() == []  # the engine removed its file on the way out


async def test_a_running_engine_is_visible_to_ps_until_it_stops():
    from pie_local.driver.fake import FakeDriver
    from pie_local.driver.types import DriverParams

    release = asyncio.Event()

    async def waiting(rt, args):
        await release.wait()
        return "done"

    engine = fake_engine(FakeDriver(DriverParams(page_size=4, n_pages=16)))
    await engine.start()
    handle = engine.launch(waiting)
    for _ in range(100):  # the engine's publisher refreshes its run file every second
        entries = ps_registry.read_all()
        if entries and [row["state"] for row in entries[0]["inferlets"]] == ["running"]:
            break
        await asyncio.sleep(0.05)
    (entry,) = entries
    assert entry["pid"] == os.getpid()
    assert [row["state"] for row in entry["inferlets"]] == ["running"]
    release.set()
    assert await handle.result() == "done"
    await engine.stop()
    assert ps_registry.read_all() == []  # the engine's stop removed its run file
