"""resolve_model: from what a user typed (or nothing) to a GGUF file on disk. No network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pie_local.models import store
from pie_local.models.errors import ModelError, ModelNotInstalledError, UnknownModelError
from pie_local.models.registry import RegistryEntry, close_names, find_entry, load_registry
from pie_local.models.spec import parse_spec


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path  # the file to load (first part of a split GGUF)
    arch: str | None
    chat_template: str | None  # models.toml override, else None (the GGUF's own is read elsewhere)
    context_length: int | None


def resolve_model(name: str | None = None) -> ResolvedModel:
    """None -> the configured default (else the starter model); an installed name -> its file;
    the starter's name -> its GGUF, assembled from the PyPI package on first use; a path to a
    .gguf file -> that file. Anything else raises a ModelError that says what to do, and so does
    a file that would crash llama.cpp or the driver (CorruptGGUFError; checked once per file)."""
    from pie_local.models.gguf_check import check_model

    resolved = _resolve(name)
    check_model(resolved.path)
    return resolved


def _resolve(name: str | None) -> ResolvedModel:
    name = (name or store.default_model_name() or store.STARTER_NAME).strip()
    if _looks_like_path(name):
        return _resolve_path(Path(name).expanduser())

    entries = load_registry()
    model = store.get(name)
    if model is None:
        model = _installed_by_spec(name, entries)
    if model is None and name.lower() == store.STARTER_NAME:
        from pie_local.models.starter import ensure_starter

        model = ensure_starter()
    if model is None:
        raise _not_installed(name, entries)
    if model.name == store.STARTER_NAME and not model.present:
        from pie_local.models.starter import ensure_starter

        model = ensure_starter()  # deleted by hand: assemble again, it needs no network
    if not model.present:
        missing = [str(f.path) for f in model.files if not f.path.is_file()]
        what = f"missing {', '.join(missing)}" if missing else "a file has changed size"
        raise ModelNotInstalledError(
            f"model '{model.name}' is installed but its files are not intact ({what}). "
            f"Run `pie-local rm {model.name}` and pull or add it again."
        )
    entry = _catalog_entry(model.name, entries)
    return ResolvedModel(
        name=model.name,
        path=model.path,
        arch=model.arch,
        chat_template=entry.chat_template if entry else None,
        context_length=model.context_length,
    )


def _looks_like_path(name: str) -> bool:
    """An existing file, or a .gguf written as a path (OWNER/REPO/FILE.gguf is a hub spec)."""
    if Path(name).expanduser().is_file():
        return True
    return name.lower().endswith(".gguf") and (name.startswith(("/", ".", "~")) or "\\" in name)


def _resolve_path(path: Path) -> ResolvedModel:
    from pie_local.models.gguf_info import read_gguf_info

    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    info = read_gguf_info(path)
    return ResolvedModel(
        name=store.default_name_for(info.path),
        path=info.path.absolute(),
        arch=info.arch,
        chat_template=None,
        context_length=info.context_length,
    )


def _installed_by_spec(name: str, entries: list[RegistryEntry]) -> store.InstalledModel | None:
    """'qwen2.5-0.5b:q4_k_m' finds 'qwen2.5-0.5b'; 'qwen2.5-0.5b' finds its only installed quant."""
    try:
        canonical = parse_spec(name, entries).name
    except ModelError:
        canonical = None
    if canonical and (model := store.get(canonical)):
        return model
    if ":" not in name and "/" not in name:
        variants = [m for m in store.list_installed() if m.name.lower().startswith(name.lower() + ":")]
        if len(variants) == 1:
            return variants[0]
    return None


def _catalog_entry(installed_name: str, entries: list[RegistryEntry]) -> RegistryEntry | None:
    return find_entry(installed_name.split(":")[0], entries) if "/" not in installed_name else None


def _not_installed(name: str, entries: list[RegistryEntry]) -> ModelError:
    installed = [m.name for m in store.list_installed()]
    try:
        spec = parse_spec(name, entries)
    except UnknownModelError as exc:
        return UnknownModelError(name, close_names(name, installed + [e.name for e in entries]) or exc.suggestions)
    except ModelError as exc:
        return exc
    variants = [n for n in installed if n.split(":")[0] == spec.name.split(":")[0]]
    also = f" Installed: {', '.join(variants)}." if variants else ""
    return ModelNotInstalledError(
        f"model '{spec.name}' is not installed. Get it with `pie-local pull {spec.name}`.{also}"
    )
