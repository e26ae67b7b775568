"""pie-local pull / add / list / show / rm: output, --json, exit codes, help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_hub import FakeHub, write_gguf

from pie_local.cli import main
from pie_local.models import hub as hub_module
from pie_local.models import store

COMMANDS = ("pull", "add", "list", "show", "rm")


def cli(command: str, *argv: str) -> int:
    """Run one command through the dispatcher, which reports errors and picks the exit status."""
    return main([command, *argv])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli(command, "--help")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"pie-local {command}" in out.split("examples:")[1]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "Tiny-Q8_0.gguf", n_layers=2, n_kv_heads=2, context_length=256)


def test_add_list_show_rm_json(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("add", str(tiny), "--name", "tiny", "--json") == 0
    added = json.loads(capsys.readouterr().out)
    assert added["name"] == "tiny" and added["path"] == str(tiny) and added["files"][0]["owned"] is False

    assert cli("list", "--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny"]["status"] == "ready" and rows["tiny"]["arch"] == "llama" and rows["tiny"]["quant"] == "Q8_0"
    assert rows["tiny"]["size"] == tiny.stat().st_size
    assert rows["gemma3-270m"]["status"].startswith("available") and rows["gemma3-270m"]["default"] is True

    assert cli("show", "tiny", "--json", "--context", "1000") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["arch"], shown["n_layers"], shown["context_length"], shown["vocab_size"]) == ("llama", 2, 256, 300)
    assert shown["memory"]["kv_cache"] == 2 * 2 * (16 + 16) * 1000 * 2
    assert shown["memory"]["total"] == shown["memory"]["weights"] + shown["memory"]["kv_cache"]
    assert {q["type"] for q in shown["quant_mix"]} == {"F16", "F32", "Q8_0"}

    assert cli("rm", "tiny", "--yes", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"name": "tiny", "deleted": [], "kept": [str(tiny)]}
    assert tiny.is_file()


def test_text_output(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli("add", str(tiny), "--default")
    capsys.readouterr()
    assert cli("list") == 0
    out = capsys.readouterr().out
    assert "Tiny-Q8_0 (default)" in out and "[referenced]" in out and "available (assembled on first use)" in out
    assert cli("show", "Tiny-Q8_0", "--context", "4096", "--kv-type", "q8_0") == 0
    out = capsys.readouterr().out
    assert "memory @ 4096 tok" in out and "(q8_0)" in out and "architecture       llama" in out
    assert cli("list", "--catalog") == 0
    out = capsys.readouterr().out
    assert "qwen2.5-0.5b" in out and "VERIFIED" in out.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert "yes" in rows["gemma3-270m"] and "no" in rows["gpt-oss-20b"] and "MXFP4" in rows["gpt-oss-20b"]
    assert cli("list", "--catalog", "--json") == 0
    catalog = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert catalog["gemma3-270m"]["verified"] is True and catalog["phi4-mini"]["verified"] is False


def test_a_model_of_an_unsupported_architecture_names_it_and_the_supported_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_models import write_unknown_arch

    from pie_local.models.gguf_check import supported_architectures

    supported = supported_architectures()
    if supported is None:
        pytest.skip("the native driver is not built")
    path = write_unknown_arch(tmp_path / "odd.gguf")
    listed = f"(supported: {', '.join(supported)})"
    assert cli("add", str(path)) == 1  # refused when added, not later when loaded
    err = capsys.readouterr().err
    assert err.startswith("pie-local: error: ") and "architecture 'pie-unknown-arch' is not supported" in err
    assert listed in err and "Traceback" not in err and store.get("odd") is None
    assert cli("show", str(path)) == 0  # the card still shows what the file is
    assert f"pie-unknown-arch (not supported; supported: {', '.join(supported)})" in capsys.readouterr().out
    assert main(["run", "text-completion", "--local", "--model", str(path), "--", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "pie-unknown-arch" in err and listed in err and "Fix: " in err and "Traceback" not in err


def test_user_errors_are_one_line_without_traceback(
    tiny: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("show", "qwen2.5-05b") == 1
    err = capsys.readouterr().err
    assert err.startswith("pie-local: error: unknown model 'qwen2.5-05b'") and "Traceback" not in err
    assert cli("rm", "nope", "--yes") == 1
    assert "not installed" in capsys.readouterr().err
    assert cli("add", str(tiny.with_name("missing.gguf"))) == 1
    assert "no such file" in capsys.readouterr().err
    assert cli("show", str(tiny), "--context", "0") == 2  # a usage error
    assert "--context must be a positive" in capsys.readouterr().err
    cli("add", str(tiny), "--name", "keep")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli("rm", "keep") == 1  # no --yes and nobody to ask
    assert "pass --yes" in capsys.readouterr().err and store.get("keep") is not None


def test_pull_json_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_gguf(tmp_path / "m.gguf", pad_bytes=1 << 16).read_bytes()
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(hub_module, "RETRY_WAIT_S", 0.01)
        hub.add_repo("org/M-GGUF", {"M-Q4_K_M.gguf": data})
        assert cli("pull", "org/M-GGUF", "--json", "--default") == 0
        pulled = json.loads(capsys.readouterr().out)
        assert pulled["name"] == "org/M-GGUF:Q4_K_M" and Path(pulled["path"]).read_bytes() == data
        assert store.default_model_name() == "org/M-GGUF:Q4_K_M"
        assert cli("pull", "org/M-GGUF:Q8_0") == 1
        assert "no Q8_0 GGUF. Quants there: Q4_K_M" in capsys.readouterr().err
        assert cli("rm", "org/M-GGUF:Q4_K_M", "--yes") == 0
        assert "deleted" in capsys.readouterr().out and not Path(pulled["path"]).exists()


def test_add_finds_a_hub_file_in_the_hf_cache(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    snapshot = tmp_path / "hf_cache" / "models--org--Tiny-GGUF" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (snapshot / "Tiny-Q8_0.gguf").write_bytes(tiny.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("ab" * 20)
    assert cli("add", "org/Tiny-GGUF/Tiny-Q8_0.gguf", "--json") == 0
    added = json.loads(capsys.readouterr().out)
    assert added["path"] == str(snapshot / "Tiny-Q8_0.gguf") and added["files"][0]["owned"] is False
    assert cli("add", "org/Tiny-GGUF/Other-Q8_0.gguf") == 1
    assert "no such file" in capsys.readouterr().err
