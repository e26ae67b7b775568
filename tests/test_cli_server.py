"""`run`, `chat`, `ps` and `stop` against a running `pie-local serve` (a subprocess on FakeDriver
engines: tests/fake_serve.py), and their fallback to an engine of their own when none runs.
One real end-to-end run on the starter model is marked slow."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from package_env import package_env
from server_helpers import fake_engine, serve_process

from pie_local.cli import main
from pie_local.server import Client

EXPECTED = "a" * 8  # what the fake server's model says to a text completion of 8 tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One FakeDriver server for the module, in its own data directory."""
    home = tmp_path_factory.mktemp("fake_serve_home")
    with serve_process(home, fake_delay=0.005) as (record, _):
        yield record, home


@pytest.fixture()
def with_server(server, monkeypatch):
    """This test's commands find the server (its data directory is theirs)."""
    record, home = server
    monkeypatch.setenv("PIE_LOCAL_HOME", str(home))
    return record


@pytest.fixture()
def local_engines(monkeypatch):
    """Commands that load the model themselves get a FakeDriver engine with the server's rule."""
    from fake_serve import echo_rule

    from pie_local.cli import run as run_cmd

    made = []

    def make_engine(args):
        made.append(args.model)
        return fake_engine(n_pages=4096, next_token=echo_rule())

    monkeypatch.setattr(run_cmd, "make_engine", make_engine)
    return made


def server_runs(record) -> list[dict]:
    async def fetch():
        async with Client(record.url) as client:
            return await client.inferlets()

    return asyncio.run(fetch())


def _default_sigint() -> None:
    # a shell without job control starts background commands with SIGINT ignored, and children
    # inherit that: the command under test gets Ctrl-C as a terminal user's foreground command does
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(home: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pie_local", *argv], env=package_env(PIE_LOCAL_HOME=str(home)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home,
                            preexec_fn=_default_sigint)


def wait_for_run(record, inferlet: str, before: set[str], timeout: float = 30.0) -> dict:
    """The first new run of ``inferlet`` once it has generated something."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in server_runs(record):
            if run["id"] not in before and run["inferlet"] == inferlet and run["tokens"] > 2:
                return run
        time.sleep(0.1)
    raise AssertionError(f"no running {inferlet} run appeared")


# ---- run and chat on the server -------------------------------------------------------------------


def test_run_streams_from_the_server_exactly_as_in_process(with_server, local_engines, capsys):
    before = {r["id"] for r in server_runs(with_server)}
    argv = ["run", "text-completion", "--", "--prompt", "Hello", "--max-tokens", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == EXPECTED and local_engines == []  # no model loaded here
    (run,) = [r for r in server_runs(with_server) if r["id"] not in before]
    assert run["inferlet"] == "text-completion" and run["state"] == "done" and run["model"] == "fake"

    assert main(["run", "text-completion", "--local", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == out and local_engines == [None]  # the same text, from this process

    assert main(["run", "text-completion", "--json", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text"] == report["result"] == out and report["model"] == "fake"
    assert report["tokens"] > 8 and report["elapsed_s"] > 0  # the run's final numbers, from the server


def test_a_user_inferlet_file_runs_on_the_server_with_the_same_output_and_errors(with_server, tmp_path, capsys):
    script = tmp_path / "shout.py"
    script.write_text(
        "import os\n"
        "from pie_local.runtime.inferlet import Param\n"
        "NAME = 'shout'\nDESCRIPTION = 'upper-cases its input'\n"
        "PARAMETERS = {'text': Param(str, required=True, help='what to shout')}\n"
        "async def main(rt, args):\n"
        "    if args.text == 'boom':\n        raise ValueError('cannot shout boom')\n"
        "    rt.send({'pid': os.getpid()})\n    return {'shout': args.text.upper()}\n"
    )
    assert main(["run", str(script), "--", "--text", "hi"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"shout": "HI"}  # nothing streamed: the result is printed
    assert json.loads(captured.err) == {"pid": with_server.pid}  # it ran in the server's process
    assert main(["run", str(script), "--", "--text", "boom"]) == 1
    err = capsys.readouterr().err
    assert "inferlet 'shout' failed: ValueError: cannot shout boom" in err and "Traceback" not in err
    assert main(["run", str(script), "--", "--bogus", "1"]) == 2  # checked here, before the server is asked
    assert "unknown argument --bogus" in capsys.readouterr().err


def test_model_errors_come_from_the_server_without_traceback(with_server, local_engines, capsys):
    assert main(["run", "text-completion", "--model", "surely-not-a-model", "--", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pie-local: error: model 'surely-not-a-model' is not available") and "Traceback" not in err
    assert local_engines == []


def test_a_model_file_goes_to_the_server_as_an_absolute_path(with_server, tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)  # the server has a cwd of its own
    assert main(["run", "text-completion", "--model", "mine.gguf", "--", "--prompt", "x"]) == 1
    assert f"model '{tmp_path / 'mine.gguf'}' is not available" in capsys.readouterr().err


def test_chat_reads_piped_turns_through_the_server(with_server, local_engines, monkeypatch, capsys):
    before = {r["id"] for r in server_runs(with_server)}
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n\nsecond\n/exit\nnever sent\n"))
    assert main(["chat", "--max-tokens", "32"]) == 0
    assert capsys.readouterr().out == "You said first.\nYou said second.\n"
    (run,) = [r for r in server_runs(with_server) if r["id"] not in before]
    assert run["inferlet"] == "chat" and run["state"] == "done" and local_engines == []


# ---- ps and stop --------------------------------------------------------------------------------------


def test_ps_lists_another_clients_run_and_stop_cancels_it(with_server, server, capsys):
    record, home = server
    before = {r["id"] for r in server_runs(record)}
    other = cli_process(home, "run", "text-completion", "--", "--prompt", "go", "--max-tokens", "3000")
    try:
        run = wait_for_run(record, "text-completion", before)
        assert main(["ps"]) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if run["id"] in line.split())
        assert line.split()[:4] == [str(record.pid), run["id"], "text-completion", "running"]
        assert line.split()[-1] == "fake" and f"server at {record.url}" in out
        assert main(["ps", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert listed["server"] == {"url": record.url, "pid": record.pid}
        assert run["id"] in [r["id"] for r in listed["runs"]]
        assert all(e["pid"] != record.pid for e in listed["engines"])  # the server's engines: listed as runs

        assert main(["stop", run["id"]]) == 0
        assert capsys.readouterr().out == f"{run['id']}: cancelled\n"
        out, err = other.communicate(timeout=30)
        assert other.returncode == 1 and "InferletCancelled" in err and out.startswith("aaa")
        assert main(["ps"]) == 0
        assert run["id"] not in capsys.readouterr().out  # finished runs only with --all
        assert main(["ps", "--all"]) == 0
        listed = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert [record.pid and str(record.pid), run["id"], "text-completion", "cancelled"] in [r[:4] for r in listed]
        assert main(["stop", run["id"]]) == 0
        assert capsys.readouterr().out == f"{run['id']}: had already ended (cancelled)\n"
    finally:
        if other.poll() is None:
            other.kill()
            other.communicate()


def test_stop_names_unknown_runs_and_a_missing_server(with_server, monkeypatch, tmp_path, capsys):
    assert main(["stop", "run-99999"]) == 1
    err = capsys.readouterr().err
    assert "no run 'run-99999'" in err and "Fix: `pie-local ps` lists the runs" in err
    monkeypatch.setenv("PIE_LOCAL_HOME", str(tmp_path))  # a data directory with no server
    assert main(["stop", "run-1"]) == 1
    assert "no pie-local server is running" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "pie_local", "stop", "--help"], capture_output=True, text=True,
                         env=package_env())
    assert out.returncode == 0 and "examples:" in out.stdout and "pie-local stop run-3" in out.stdout


def test_ctrl_c_cancels_the_run_on_the_server(server):
    record, home = server
    before = {r["id"] for r in server_runs(record)}
    proc = cli_process(home, "run", "text-completion", "--", "--prompt", "go", "--max-tokens", "3000")
    try:
        run = wait_for_run(record, "text-completion", before)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "interrupted" in err
        assert next(r for r in server_runs(record) if r["id"] == run["id"])["state"] == "cancelled"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---- no server: the embedded engine -------------------------------------------------------------------


def test_without_a_server_commands_load_the_model_themselves(local_engines, capsys):
    assert main(["run", "text-completion", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == EXPECTED and local_engines == [None]
    assert main(["ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["server"] is None


def test_a_stale_or_silent_server_record_falls_back_and_a_named_server_must_answer(local_engines, capsys):
    import socket

    from pie_local.server import record

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.write(record.ServerRecord(pid=int(dead.stdout), host="127.0.0.1", port=1, url="http://127.0.0.1:1",
                                     version="0"))
    assert main(["run", "text-completion", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == EXPECTED and local_engines == [None]

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a port nothing listens on
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    record.write(record.ServerRecord(pid=os.getpid(), host="127.0.0.1", port=1, url=url, version="0"))
    assert main(["run", "text-completion", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == EXPECTED and f"the server at {url} does not answer" in captured.err
    assert main(["run", "text-completion", "--server", url, "--", "--prompt", "Hello"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the pie-local server at {url}" in err and "pie-local serve" in err
    assert local_engines == [None, None]
    sock.close()


def test_local_forces_the_embedded_engine_even_with_a_server(with_server, local_engines, capsys):
    before = {r["id"] for r in server_runs(with_server)}
    assert main(["run", "text-completion", "--local", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == EXPECTED and local_engines == [None]
    assert {r["id"] for r in server_runs(with_server)} == before  # the server saw nothing
    assert main(["ps", "--local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["server"] is None


# ---- a real server --------------------------------------------------------------------------------------


def _driver_built() -> bool:
    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.slow
@pytest.mark.real_driver
@pytest.mark.skipif(not _driver_built(), reason="the native driver is not built")
@pytest.mark.timeout(600)
def test_run_on_a_real_server_matches_the_embedded_engine(starter_gguf, tmp_path):
    from pie_local.models import store

    os.environ["PIE_LOCAL_HOME"] = str(tmp_path)  # isolated_home's monkeypatch restores it
    store.add(starter_gguf, name="starter-local")
    own = ["run", "text-completion", "--model", "starter-local", "--threads", "2"]
    inferlet = ["--", "--prompt", "The capital of France is", "--max-tokens", "12"]
    with serve_process(tmp_path, "--model", "starter-local", "--threads", "2", "--pages", "64") as (record, _):
        remote = cli_process(tmp_path, *own, *inferlet)
        out, err = remote.communicate(timeout=300)
        assert remote.returncode == 0, err
        (run,) = server_runs(record)
        assert run["state"] == "done" and run["model"] == "starter-local" and run["tokens"] > 12
    local = cli_process(tmp_path, *own, "--local", *inferlet)
    expected, err = local.communicate(timeout=300)
    assert local.returncode == 0, err
    assert len(out) > 5 and out == expected  # greedy: the same text, on the server or in process
