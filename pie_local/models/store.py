"""The local model store: which models are installed, where their files are, who owns them.

`<models dir>/index.json` maps an installed name to its files. A file is *owned* when pie-local
put it there (pull, the assembled starter model) and *referenced* when it belongs to someone
else (`add` in place, a file reused from the Hugging Face cache): `remove` deletes owned files
only. The index is rewritten atomically (temp file + fsync + os.replace) under a file lock, so a
crash or two concurrent pulls never leave it corrupt. The user's default model lives in
`<data dir>/config.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pie_local.models.errors import GGUFError, ModelError, ModelNotInstalledError
from pie_local.paths import home, models_dir

INDEX_VERSION = 1
STARTER_NAME = "gemma3-270m"


@dataclass(frozen=True)
class ModelFile:
    path: Path
    size: int
    sha256: str | None
    owned: bool  # True: pie-local put it there and `rm` deletes it

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "sha256": self.sha256, "owned": self.owned}

    @staticmethod
    def from_json(data: dict[str, Any]) -> ModelFile:
        return ModelFile(Path(data["path"]), int(data["size"]), data.get("sha256"), bool(data["owned"]))


@dataclass(frozen=True)
class InstalledModel:
    name: str
    files: tuple[ModelFile, ...]  # one, or every part of a split GGUF in order
    source: str  # "hub", "local" (added in place), "package" (the starter)
    repo: str | None = None
    revision: str | None = None  # hub commit the files came from
    quant: str | None = None
    arch: str | None = None
    context_length: int | None = None
    added_at: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        """The file to load (the first part of a split GGUF)."""
        return self.files[0].path

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def present(self) -> bool:
        """Every file is on disk with its recorded size (no hashing: cheap enough for `list`)."""
        return all(f.path.is_file() and f.path.stat().st_size == f.size for f in self.files)

    @property
    def owned(self) -> bool:
        return any(f.owned for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "files": [f.to_json() for f in self.files],
            "size": self.size,
            "source": self.source,
            "repo": self.repo,
            "revision": self.revision,
            "quant": self.quant,
            "arch": self.arch,
            "context_length": self.context_length,
            "added_at": self.added_at,
            "present": self.present,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> InstalledModel:
        return InstalledModel(
            name=data["name"],
            files=tuple(ModelFile.from_json(f) for f in data["files"]),
            source=data["source"],
            repo=data.get("repo"),
            revision=data.get("revision"),
            quant=data.get("quant"),
            arch=data.get("arch"),
            context_length=data.get("context_length"),
            added_at=float(data.get("added_at", 0.0)),
        )


# ---------------------------------------------------------------------------------------------
# Files: atomic JSON, locks
# ---------------------------------------------------------------------------------------------


def index_path() -> Path:
    return models_dir() / "index.json"


def config_path() -> Path:
    return home() / "config.json"


def locks_dir() -> Path:
    path = models_dir() / ".locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(name: str, timeout: float = 60.0) -> Iterator[None]:
    """An inter-process lock named `name` under the models directory."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(locks_dir() / f"{name}.lock"))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise ModelError(
            f"another pie-local process holds the lock '{name}' for over {timeout:.0f} s; "
            f"if none is running, delete {lock.lock_file}"
        ) from None
    try:
        yield
    finally:
        lock.release()


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} ({what}) is not valid JSON: {exc}. Fix or delete it.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} ({what}) must hold a JSON object. Fix or delete it.")
    return data


def _read_index() -> dict[str, InstalledModel]:
    data = _read_json(index_path(), "model index")
    if data and data.get("version") != INDEX_VERSION:
        raise ModelError(f"{index_path()} has index version {data.get('version')}, expected {INDEX_VERSION}")
    try:
        return {name: InstalledModel.from_json(rec) for name, rec in data.get("models", {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{index_path()} has a malformed record ({exc}). Fix or delete it.") from None


def _write_index(models: dict[str, InstalledModel]) -> None:
    write_json_atomic(
        index_path(),
        {"version": INDEX_VERSION, "models": {name: models[name].to_json() for name in sorted(models)}},
    )


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------


def list_installed() -> list[InstalledModel]:
    """Installed models by name, plus the starter model, which is always available: when it has
    not been assembled yet its record points where it will be (`present` is False)."""
    models = _read_index()
    if STARTER_NAME not in models:
        from pie_local.models.starter import starter_placeholder

        models[STARTER_NAME] = starter_placeholder()
    return [models[name] for name in sorted(models)]


def get(name: str) -> InstalledModel | None:
    """The record of an installed name (exact match), or None."""
    return _read_index().get(name)


def record(model: InstalledModel) -> None:
    """Add or replace a model's record."""
    with locked("index"):
        models = _read_index()
        models[model.name] = model
        _write_index(models)


def known_sha256(path: Path) -> str | None:
    """The sha256 recorded for `path` by any installed model (lets pull skip re-hashing)."""
    for model in _read_index().values():
        for f in model.files:
            if f.path == path and f.sha256:
                return f.sha256
    return None


# ---------------------------------------------------------------------------------------------
# add / remove / default
# ---------------------------------------------------------------------------------------------


def default_name_for(path: Path) -> str:
    """'Qwen2.5-0.5B-Instruct-Q4_K_M-00001-of-00002.gguf' -> 'Qwen2.5-0.5B-Instruct-Q4_K_M'."""
    from pie_local.models.gguf_info import SPLIT_RE

    m = SPLIT_RE.match(path.name)
    return m["stem"] if m else path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name


def add(path: str | os.PathLike[str], name: str | None = None) -> InstalledModel:
    """Register a GGUF already on disk under `name` (default: its file name) without copying it.
    The file stays where it is and `remove` never deletes it."""
    from pie_local.models.gguf_check import check_architecture, check_model
    from pie_local.models.gguf_info import read_gguf_info

    file = Path(path).expanduser()
    if not file.exists():
        raise ModelError(f"{file}: no such file")
    file = file.absolute()  # not resolve(): an HF-cache snapshot symlink keeps its readable name
    info = read_gguf_info(file)  # raises GGUFError for anything that is not a GGUF
    if info.arch is None:
        raise GGUFError(f"{file}: the GGUF has no general.architecture; it cannot be loaded as a model")
    check_architecture(file, info.arch)  # a model the driver cannot run is refused now, not at load
    check_model(file)  # CorruptGGUFError for a file that would crash llama.cpp or the driver
    name = (name or default_name_for(info.path)).strip()
    if not name or any(c.isspace() for c in name):
        raise ModelError(f"invalid model name '{name}': use a non-empty name without spaces")
    from pie_local.models.registry import find_entry

    with locked("index"):
        models = _read_index()
        if name in models or name == STARTER_NAME or find_entry(name.split(":")[0]) is not None:
            raise ModelError(
                f"the name '{name}' is already taken (installed or in the catalogue); choose another with --name"
            )
        model = InstalledModel(
            name=name,
            files=tuple(ModelFile(p, p.stat().st_size, None, owned=False) for p in info.files),
            source="local",
            quant=info.file_type,
            arch=info.arch,
            context_length=info.context_length,
        )
        models[name] = model
        _write_index(models)
    return model


@dataclass(frozen=True)
class Removal:
    model: InstalledModel
    deleted: tuple[Path, ...]  # files pie-local owned and deleted
    kept: tuple[Path, ...]  # files it only referenced, or that another installed name still uses


def remove(name: str) -> Removal:
    """Forget an installed model and delete the files pie-local downloaded for it. Referenced
    files (added in place, HF cache) and files another installed name still uses are kept."""
    with locked("index"):
        models = _read_index()
        model = models.pop(name, None)
        if model is None:
            raise not_installed(name, list(models))
        still_used = {f.path for other in models.values() for f in other.files}
        deleted, kept = [], []
        for f in model.files:
            if f.owned and f.path not in still_used:
                f.path.unlink(missing_ok=True)
                _prune_empty_dirs(f.path.parent)
                deleted.append(f.path)
            else:
                kept.append(f.path)
        _write_index(models)
    if default_model_name() == name:
        set_default_model(None)
    return Removal(model, tuple(deleted), tuple(kept))


def _prune_empty_dirs(directory: Path) -> None:
    root = models_dir().resolve()
    directory = directory.resolve()
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def not_installed(name: str, installed: list[str] | None = None) -> ModelNotInstalledError:
    """The error for a name that is not installed, with installed names like it."""
    from pie_local.models.registry import close_names

    installed = [m.name for m in list_installed()] if installed is None else installed
    near = close_names(name, installed)
    hint = f" Installed names like it: {', '.join(near)}." if near else ""
    return ModelNotInstalledError(f"'{name}' is not installed.{hint} See `pie-local list`.")


def default_model_name() -> str | None:
    """The user's configured default model, or None (then the starter model is the default)."""
    value = _read_json(config_path(), "pie-local config").get("default_model")
    return value if isinstance(value, str) and value else None


def set_default_model(name: str | None) -> None:
    """Make `name` the model used when none is given; None restores the starter model."""
    with locked("config"):
        config = _read_json(config_path(), "pie-local config")
        if name is None:
            config.pop("default_model", None)
        else:
            config["default_model"] = name
        write_json_atomic(config_path(), config)
