"""Every command reports errors the same way: `pie-local: error: ...` on stderr, exit status 1 for an
error and 2 for a usage error, no traceback; the same exception gets the same explanation in the
CLI and the TUI."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fake_hub import write_gguf

from pie_local.cli import main
from pie_local.present.problems import DRIVER_FIXES, UsageError, UserError, explain


def test_one_error_two_commands_one_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "surely-not-a-model"]) == 1
    shown = capsys.readouterr().err
    assert main(["run", "text-completion", "--model", "surely-not-a-model", "--", "--prompt", "x"]) == 1
    ran = capsys.readouterr().err
    assert shown == ran
    assert shown.startswith("pie-local: error: unknown model 'surely-not-a-model'") and "Traceback" not in shown


def test_usage_errors_exit_2_in_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    for argv in (["show", str(gguf), "--context", "-5"], ["run"], ["run", "text-completion", "--", "--bogus", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("pie-local: error: ") and "Traceback" not in err, argv


def test_the_fix_is_printed_below_the_message(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["tui"]) == 1
    assert capsys.readouterr().err == ("pie-local: error: the TUI needs an interactive terminal\n"
                                       "Fix: for scripts use `pie-local run` or `pie-local chat`\n")


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from pie_local.cli import ps

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(ps, "run", broken)
    with pytest.raises(KeyError):
        main(["ps"])


def test_explain_maps_each_kind_of_failure() -> None:
    from pie_local.driver.types import DriverError
    from pie_local.runtime.inferlet import InferletError

    assert explain(DriverError("format", "bad magic")).fix == DRIVER_FIXES["format"]
    assert "pie-local doctor" in explain(DriverError("backend", "ggml failed")).fix
    usage = explain(InferletError("no inferlet named 'x'"))
    assert isinstance(usage, UsageError) and usage.exit_code == 2
    disk = explain(OSError(errno.ENOSPC, "No space left on device"))
    assert disk.message.startswith("disk full") and disk.exit_code == 1
    assert explain(OSError(errno.EROFS, "Read-only file system")).exit_code == 1
    mine = UserError("boom", "do this")
    assert explain(mine) is mine and str(mine) == "boom\nFix: do this"
    assert explain(ValueError("odd")) is None and explain(KeyError("k")) is None  # bugs: not explained


def test_explain_maps_a_servers_answers() -> None:
    from pie_local.server.client import ClientError, ServerNotFound

    key = explain(ClientError(401, "missing or wrong API key", "invalid_api_key"))
    assert key.message.startswith("the server wants an API key") and "PIE_LOCAL_API_KEY" in key.fix
    assert "--local" in explain(ClientError(403, "inferlet: local clients only", "inferlet_file_forbidden")).fix
    assert "retry" in explain(ClientError(503, "the KV cache is full", "out_of_kv_pages")).fix
    args = explain(ClientError(400, "args: bad", "invalid_value", "args"))
    assert isinstance(args, UsageError) and args.exit_code == 2
    missing = explain(ClientError(404, "model 'x' is not available: pull it", "model_not_found"))
    assert missing.message == "model 'x' is not available: pull it" and missing.exit_code == 1
    assert explain(ClientError(500, "boom", "internal_error")).message == "the server failed: boom"
    gone = explain(ServerNotFound("cannot reach the pie-local server at http://127.0.0.1:1"))
    assert "pie-local serve" in gone.fix and "--local" in gone.fix
