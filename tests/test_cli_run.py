"""`pie-local run`, `chat` and `bench` plumbing: argument handling, streaming, errors; one real
end-to-end subprocess run on the starter model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pie_local.driver.fake import FakeDriver, FakeTokenizer
from pie_local.driver.types import DriverParams
from runtime_helpers import fake_engine as engine_on
from package_env import package_env

REPO = Path(__file__).resolve().parents[1]


def cli(module, argv: list[str]) -> int:
    """Run a command module through the dispatcher, which reports errors and picks the exit status."""
    from pie_local.cli import main

    return main([module.__name__.rsplit(".", 1)[-1], *argv])


@pytest.fixture
def fake_engine(monkeypatch):
    """`run` and `chat` get an engine over FakeDriver instead of loading a model."""
    from pie_local.cli import run as run_cmd

    drivers = []

    def make_engine(args):
        driver = FakeDriver(DriverParams(page_size=4, n_pages=1024, max_batch_tokens=128))
        drivers.append(driver)
        return engine_on(driver)

    monkeypatch.setattr(run_cmd, "make_engine", make_engine)
    return drivers


def test_list_shows_every_stdlib_inferlet(capsys):
    from pie_local.cli import run as run_cmd

    assert cli(run_cmd, ["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("text-completion", "best-of-n", "prompt-lookup", "react-agent", "attention-sink"):
        assert name in out
    assert "Sample n completions from forks" in out
    assert cli(run_cmd, ["--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    tc = next(r for r in rows if r["name"] == "text-completion")
    assert tc["parameters"]["prompt"]["required"] is True


def test_inferlet_help_and_errors(capsys):
    from pie_local.cli import run as run_cmd

    assert cli(run_cmd, ["text-completion", "--", "--help"]) == 0
    usage = capsys.readouterr().out
    assert "--prompt STR" in usage and "--max-tokens INT" in usage
    assert cli(run_cmd, ["no-such-inferlet"]) == 2
    err = capsys.readouterr().err
    assert "no inferlet named 'no-such-inferlet'" in err and "text-completion" in err
    assert cli(run_cmd, ["text-completion", "--", "--max-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "missing required argument --prompt" in err and "--temperature FLOAT" in err  # the usage follows
    assert cli(run_cmd, ["text-completion", "--", "--prompt", "x", "--bogus", "1"]) == 2
    assert "unknown argument --bogus" in capsys.readouterr().err
    assert cli(run_cmd, []) == 2
    assert "pie-local run --list" in capsys.readouterr().err


def test_run_streams_only_the_generated_text(fake_engine, capsys):
    from pie_local.cli import run as run_cmd

    assert cli(run_cmd, ["text-completion", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert cli(run_cmd, ["text-completion", "--json", "--", "--prompt", "Hello", "--max-tokens", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text"] == report["result"] == out  # stdout held exactly the generated text
    assert "Hello" not in out and report["inferlet"] == "text-completion" and report["tokens"] > 0


def test_run_a_user_inferlet_file_and_its_failure(fake_engine, tmp_path, capsys):
    from pie_local.cli import run as run_cmd

    script = tmp_path / "shout.py"
    script.write_text(
        "from pie_local.runtime.inferlet import Param\n"
        "NAME = 'shout'\nDESCRIPTION = 'upper-cases its input'\n"
        "PARAMETERS = {'text': Param(str, required=True, help='what to shout')}\n"
        "async def main(rt, args):\n"
        "    if args.text == 'boom':\n        raise ValueError('cannot shout boom')\n"
        "    rt.send({'length': len(args.text)})\n    return {'shout': args.text.upper()}\n"
    )
    assert cli(run_cmd, [str(script), "--", "--text", "hi"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"shout": "HI"}  # nothing streamed: the result is printed
    assert json.loads(captured.err) == {"length": 2}  # data messages go to stderr
    assert cli(run_cmd, [str(script), "--", "--text", "boom"]) == 1
    err = capsys.readouterr().err
    assert "inferlet 'shout' failed: ValueError: cannot shout boom" in err and "Traceback" not in err


def test_model_errors_are_reported_without_traceback(capsys):
    from pie_local.cli import run as run_cmd

    assert cli(run_cmd, ["text-completion", "--model", "surely-not-a-model", "--", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "surely-not-a-model" in err and "Traceback" not in err


def test_chat_reads_piped_turns(fake_engine, monkeypatch, capsys):
    from pie_local.cli import chat as chat_cmd

    tok = FakeTokenizer()

    def reply(visible):  # the toy model answers "ok" to every turn
        text = tok.decode(visible)
        said = text[text.rfind("<start_of_turn>model\n") + len("<start_of_turn>model\n"):]
        return tok.encode("ok"[len(said)])[0] if len(said) < 2 else tok.token_id("<end_of_turn>")

    from pie_local.cli import run as run_cmd

    monkeypatch.setattr(run_cmd, "make_engine", lambda args: engine_on(FakeDriver(
        DriverParams(page_size=4, n_pages=1024, max_batch_tokens=128), next_token=reply)))
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n\nsecond\n/exit\nnever sent\n"))
    assert cli(chat_cmd, ["--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == "ok\nok\n"


def test_bench_cli_unknown_model_is_a_clear_error(capsys):
    from pie_local.cli import bench as bench_cmd

    assert cli(bench_cmd, ["--only", "driver", "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "pie-local: error:" in err and "no-such-model" in err and "Traceback" not in err


def test_split_remainder():
    from pie_local.cli.run import split_remainder

    assert split_remainder(["--prompt", "x"]) == ([], ["--prompt", "x"])
    assert split_remainder(["--json", "--", "--prompt", "a -- b"]) == (["--json"], ["--prompt", "a -- b"])


# ---------------------------------------------------------------------------- real model, subprocess

def _driver_built() -> bool:
    try:
        from pie_local.driver import Driver  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.real_driver
@pytest.mark.slow
@pytest.mark.skipif(not _driver_built(), reason="the native driver is not built")
def test_cli_run_end_to_end_on_the_starter_model(starter_gguf, isolated_home):
    import asyncio

    from pie_local.runtime.engine import Engine, EngineConfig

    env = package_env(PIE_LOCAL_HOME=str(isolated_home))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from pie_local.cli import main; sys.exit(main())", "run",
         "text-completion", "--model", str(starter_gguf), "--threads", "2", "--",
         "--prompt", "The capital of France is", "--max-tokens", "12"],
        capture_output=True, text=True, timeout=240, env=env, cwd=isolated_home,  # not the source tree
    )
    assert proc.returncode == 0, proc.stderr

    async def expected() -> str:
        async with Engine(str(starter_gguf), EngineConfig(driver=DriverParams(n_threads=2, n_pages=64))) as engine:
            return await engine.run("text-completion", {"prompt": "The capital of France is", "max_tokens": 12})

    text = asyncio.run(expected())
    assert len(text) > 5
    assert proc.stdout == text  # only the generated text: no prompt echo, no logs, no newline added


def test_llama_baseline_loads_weights_without_extra_buffer_types():
    import llama_cpp.llama_cpp as lib

    from pie_local.bench.baseline import no_extra_bufts

    assert lib.llama_model_default_params().use_extra_bufts is True  # llama.cpp's default: AMX repacking on
    with no_extra_bufts():
        assert lib.llama_model_default_params().use_extra_bufts is False
    assert lib.llama_model_default_params().use_extra_bufts is True


def test_runtime_report_formatting():
    from pie_local.bench import format_runtime_report

    row = {"pie_s": 2.0, "llama_cpp_s": 8.0, "pie_tokens": 256, "llama_cpp_tokens": 256, "pie_tok_s": 128.0,
           "llama_cpp_tok_s": 32.0, "speedup": 4.0}
    report = {"model": "m", "threads": 2, "load_avg_1m": 0.5,
              "workloads": {"best_of": row, "chats": {**row, "throughput_ratio": 4.0}},
              "overhead": {"runtime_step_ms": 10.3, "bare_driver_step_ms": 10.0, "overhead_pct": 3.0},
              "targets": {"best_of_speedup>=3": True, "overhead_pct<=5": True}}
    text = format_runtime_report(report)
    assert "best_of" in text and "4.00x" in text and "overhead +3.0%" in text and "MISSED" not in text
