"""Where pie-local keeps its files: one data directory, overridable with PIE_LOCAL_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """The data directory (models, index, snapshots, sessions). Created on first use."""
    override = os.environ.get("PIE_LOCAL_HOME")
    root = Path(override).expanduser() if override else Path(platformdirs.user_data_dir("pie-local"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def snapshots_dir() -> Path:
    path = home() / "snapshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sessions_db() -> Path:
    return home() / "sessions.sqlite3"
