"""The local store (add in place, rm, index, default model) and resolve_model, without network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fake_hub import write_gguf

from pie_local.models import (
    STARTER_NAME,
    GGUFError,
    ModelError,
    ModelNotInstalledError,
    UnknownModelError,
    resolve_model,
    store,
)
from pie_local.paths import models_dir


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A GGUF outside pie-local's directory."""
    (tmp_path / "elsewhere").mkdir()
    return write_gguf(tmp_path / "elsewhere" / "Tiny-Q8_0.gguf", context_length=333)


def test_add_in_place_and_rm_keeps_the_file(tiny: Path) -> None:
    before = sorted(models_dir().rglob("*.gguf"))
    model = store.add(tiny)
    assert (model.name, model.source, model.arch, model.quant, model.context_length) == (
        "Tiny-Q8_0",
        "local",
        "llama",
        "Q8_0",
        333,
    )
    assert model.path == tiny and not model.owned and model.present
    assert sorted(models_dir().rglob("*.gguf")) == before  # no copy
    assert [m.name for m in store.list_installed()] == ["Tiny-Q8_0", STARTER_NAME]
    removal = store.remove("Tiny-Q8_0")
    assert removal.deleted == () and removal.kept == (tiny,)
    assert tiny.is_file() and store.get("Tiny-Q8_0") is None


def test_add_errors(tiny: Path, tmp_path: Path) -> None:
    store.add(tiny, name="mine")
    with pytest.raises(ModelError, match="already taken"):
        store.add(tiny, name="mine")
    with pytest.raises(ModelError, match="already taken"):
        store.add(tiny, name="qwen2.5-0.5b")  # a catalogue name
    (tmp_path / "notes.gguf").write_text("hello, this is a text file and not a model at all")
    with pytest.raises(GGUFError, match="not a GGUF"):
        store.add(tmp_path / "notes.gguf")
    with pytest.raises(ModelError, match="no such file"):
        store.add(tmp_path / "missing.gguf")


def test_index_is_valid_json_and_a_corrupt_one_is_a_clear_error(tiny: Path) -> None:
    store.add(tiny, name="a")
    store.add(tiny, name="b")
    data = json.loads(store.index_path().read_text())
    assert data["version"] == 1 and sorted(data["models"]) == ["a", "b"]
    assert not list(store.index_path().parent.glob(".index.json.*"))  # no temp files left
    store.index_path().write_text('{"version": 1, "models": {"a": {"na')
    with pytest.raises(ModelError, match="not valid JSON.*Fix or delete it"):
        store.list_installed()


def test_starter_is_listed_as_available_without_assembling() -> None:
    (starter,) = store.list_installed()
    assert starter.name == STARTER_NAME and starter.source == "package" and not starter.present
    assert starter.size == 253113024 and not starter.path.exists()


def test_resolve_installed_path_and_default(tiny: Path) -> None:
    store.add(tiny, name="mine")
    resolved = resolve_model("mine")
    assert (resolved.name, resolved.path, resolved.arch, resolved.context_length) == ("mine", tiny, "llama", 333)
    assert resolved.chat_template is None
    direct = resolve_model(str(tiny))
    assert direct.path == tiny and direct.name == "Tiny-Q8_0" and direct.arch == "llama"
    store.set_default_model("mine")
    assert resolve_model().name == "mine" and resolve_model(None).path == tiny
    store.remove("mine")
    assert store.default_model_name() is None  # removing the default restores the starter


def test_resolve_errors(tiny: Path) -> None:
    with pytest.raises(UnknownModelError, match="Did you mean: qwen2.5-0.5b"):
        resolve_model("qwen2.5-05b")
    with pytest.raises(ModelNotInstalledError, match="pie-local pull llama3.2-1b:Q8_0"):
        resolve_model("llama3.2-1b:q8_0")
    with pytest.raises(ModelError, match="no such file"):
        resolve_model("./nowhere/model.gguf")
    store.add(tiny, name="fragile")
    tiny.unlink()
    with pytest.raises(ModelNotInstalledError, match="not intact.*pie-local rm fragile"):
        resolve_model("fragile")


def test_resolve_picks_the_only_installed_quant(tiny: Path) -> None:
    from pie_local.models.store import InstalledModel, ModelFile, record

    record(
        InstalledModel("qwen2.5-0.5b:Q8_0", (ModelFile(tiny, tiny.stat().st_size, None, True),), "hub", arch="llama")
    )
    assert resolve_model("qwen2.5-0.5b").name == "qwen2.5-0.5b:Q8_0"


def test_starter_resolved_with_no_network_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model works offline: assembled from the PyPI package, sha256-checked."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail

    def no_network(*args, **kwargs):
        raise AssertionError("the starter model must not touch the network")

    import socket

    monkeypatch.setattr(socket.socket, "connect", no_network)
    resolved = resolve_model()
    assert resolved.name == STARTER_NAME and resolved.arch == "gemma3" and resolved.context_length == 32768
    assert resolved.path == models_dir() / STARTER_NAME / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256(resolved.path.read_bytes()).hexdigest()
    assert digest == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    mtime = resolved.path.stat().st_mtime_ns
    assert resolve_model(STARTER_NAME).path == resolved.path
    assert resolved.path.stat().st_mtime_ns == mtime  # not assembled twice
    (starter,) = [m for m in store.list_installed() if m.name == STARTER_NAME]
    assert starter.present and starter.files[0].owned

    from pie_local.models.pull import pull

    assert pull(STARTER_NAME).path == resolved.path  # `pie-local pull gemma3-270m` needs no network either
