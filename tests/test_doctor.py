"""`pie-local doctor`: what it reports, its exit status, and its fixes when something is broken."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pie_local.cli import doctor
from package_env import package_env
from pie_local.driver import _ffi



def run_doctor(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    code = doctor.run(parser.parse_args(argv))
    return code, capsys.readouterr().out


def run_doctor_process(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """The doctor in a fresh process, so the driver library is looked up again under `env`."""
    script = (
        "import argparse, sys\n"
        "from pie_local.cli import doctor\n"
        "p = argparse.ArgumentParser(); doctor.add_arguments(p)\n"
        "sys.exit(doctor.run(p.parse_args(sys.argv[1:])))\n"
    )
    full_env = package_env(**env)
    return subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_help_has_examples() -> None:
    doc = doctor.__doc__ or ""
    assert "examples:" in doc and "pie-local doctor --json" in doc


@pytest.mark.real_driver
def test_json_reports_every_check_and_runs_a_token(capsys) -> None:
    code, out = run_doctor(["--json", "--threads", "2"], capsys)
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["python", "ggml", "cpu", "driver", "rpc", "placement", "model"]
    assert code == 0 and report["ok"] is True, report
    assert checks["rpc"]["data"]["protocol"]  # the README's install has ggml's RPC backend
    (cpu,) = checks["placement"]["data"]["devices"]  # no GPU, no worker: the whole model on the CPU
    assert cpu["device"] == "CPU" and cpu["layers"] == "0-17" and cpu["input"] and cpu["output"]
    assert cpu["weight_bytes"] > 100 << 20 and cpu["kv_bytes"] > 0
    assert checks["driver"]["data"]["abi_version"] == _ffi.ABI_VERSION
    assert any(d["type"] == "cpu" for d in checks["ggml"]["data"]["devices"])
    assert checks["ggml"]["data"]["version"]  # ggml_version() of the loaded library
    assert checks["cpu"]["data"]["features"]
    model = checks["model"]["data"]
    assert model["arch"] == "gemma3" and model["backend"]
    assert model["token_s"] > 0 and model["first_token_s"] > 0
    assert 0 <= model["token"] < 262_144


@pytest.mark.real_driver
def test_table_output_through_the_cli(capsys) -> None:
    from pie_local.cli import main

    code = main(["doctor", "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    for name in ("python", "ggml", "cpu", "driver", "rpc", "placement", "model"):
        assert any(line.startswith(name) and "  ok  " in line for line in lines), out
    assert "all checks passed" in out


@pytest.mark.real_driver
def test_broken_model_fails_with_a_fix(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    code, out = run_doctor(["--json", "--model", str(bad)], capsys)
    report = json.loads(out)
    model = next(c for c in report["checks"] if c["name"] == "model")
    assert code == 1 and report["ok"] is False
    assert model["status"] == "fail" and "not a GGUF" in model["detail"]
    assert "download it again" in model["fix"]


def test_missing_driver_library_fails_with_a_fix(tmp_path: Path) -> None:
    proc = run_doctor_process(["--json"], PIE_DRIVER_LIB=str(tmp_path / "missing" / "libpie_driver.so"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["driver"]["status"] == "fail" and "not found" in checks["driver"]["detail"]
    assert "PIE_DRIVER_LIB" in checks["driver"]["fix"] or "pip install" in checks["driver"]["fix"]
    assert checks["model"]["status"] == "skip"
    assert checks["python"]["status"] == "ok"
