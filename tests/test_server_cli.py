"""`pie-local serve` as a command: its record in the data directory, refusals before binding."""

from __future__ import annotations

import os
import subprocess
import sys

from package_env import package_env

from pie_local.server import record


def serve(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pie_local", "serve", *args],
                          env=package_env(PIE_LOCAL_HOME=str(home)), capture_output=True, text=True, timeout=60,
                          cwd=home)


def test_record_round_trip_and_stale_records_are_dropped(isolated_home):
    assert record.find_server() is None
    mine = record.ServerRecord(pid=os.getpid(), host="127.0.0.1", port=8471, url="http://127.0.0.1:8471",
                               version="0.1.0")
    record.write(mine)
    assert record.find_server() == mine
    assert oct(record.record_path().stat().st_mode & 0o777) == "0o600"
    record.remove(pid=os.getpid() + 1)  # another process never removes our record
    assert record.find_server() == mine
    record.remove()
    assert record.find_server() is None

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.write(record.ServerRecord(pid=int(dead.stdout), host="127.0.0.1", port=1, url="http://127.0.0.1:1",
                                     version="0.1.0"))
    assert record.find_server() is None and not record.record_path().exists()  # a crashed server's record
    record.record_path().write_text("{not json")
    assert record.find_server() is None and not record.record_path().exists()


def test_binding_beyond_loopback_needs_a_key(isolated_home):
    out = serve("--host", "0.0.0.0", "--port", "0", home=isolated_home)
    assert out.returncode == 2 and "API key" in out.stderr and out.stderr.startswith("pie-local: error:")
    assert not record.record_path().exists()


def test_a_second_server_is_refused_and_unknown_models_are_named(isolated_home):
    record.write(record.ServerRecord(pid=os.getpid(), host="127.0.0.1", port=8471, url="http://127.0.0.1:8471",
                                     version="0.1.0"))
    out = serve("--port", "0", home=isolated_home)
    assert out.returncode == 1 and "already runs at http://127.0.0.1:8471" in out.stderr
    record.remove()
    out = serve("--port", "0", "--model", "no-such-model", home=isolated_home)
    assert out.returncode == 1 and "no-such-model" in out.stderr


def test_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "pie_local", "serve", "--help"], capture_output=True, text=True,
                         env=package_env())
    assert out.returncode == 0 and "examples:" in out.stdout and "--keep-alive" in out.stdout
