"""Subprocesses of the tests run the pie_local the tests import: the installed package in CI (a
clean clone after `pip install .`), the source tree when a developer puts it on PYTHONPATH."""

from __future__ import annotations

import os
from pathlib import Path

import pie_local

PACKAGE_ROOT = Path(pie_local.__file__).resolve().parents[1]  # the directory holding pie_local/


def package_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
