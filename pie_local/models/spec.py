"""Model specs as users type them, and the installed name each one gets.

    NAME[:QUANT]            a models.toml entry          qwen2.5-0.5b, qwen2.5-0.5b:Q8_0
    OWNER/REPO[:QUANT]      a hub repo, file by quant    bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0
    OWNER/REPO/FILE.gguf    one hub file (or split set)  Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q8_0.gguf

Hub page URLs (https://huggingface.co/OWNER/REPO/blob/main/FILE.gguf) are accepted too. The
installed name of a catalogue model at its default quant is its bare name; everything else is
installed under the canonical spec, so the same text pulls it and later loads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pie_local.models.errors import ModelError, UnknownModelError
from pie_local.models.registry import DEFAULT_QUANT, QUANT_RE, REPO_RE, RegistryEntry, close_names, normalize_quant

_URL_PREFIX = re.compile(r"^(https?://)?(www\.)?(huggingface\.co|hf\.co)/", re.IGNORECASE)
_URL_REVISION = re.compile(r"^([^/]+/[^/]+)/(?:blob|resolve)/[^/]+/(.+)$")


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "catalog" (models.toml), "repo" (OWNER/REPO:QUANT), "file" (OWNER/REPO/FILE.gguf)
    name: str  # the installed name
    repo: str | None = None
    quant: str | None = None
    filename: str | None = None  # "file" specs: path inside the repo
    entry: RegistryEntry | None = None


def parse_spec(text: str, entries: list[RegistryEntry]) -> ModelSpec:
    spec = _URL_PREFIX.sub("", text.strip())
    if m := _URL_REVISION.match(spec):  # .../blob/main/FILE -> OWNER/REPO/FILE
        spec = f"{m[1]}/{m[2]}"
    if not spec:
        raise ModelError("empty model name")
    if "/" not in spec:
        return _catalog_spec(spec, entries)
    if spec.lower().endswith(".gguf"):
        owner, _, rest = spec.partition("/")
        repo_name, _, filename = rest.partition("/")
        repo = f"{owner}/{repo_name}"
        if not filename or not REPO_RE.match(repo):
            raise ModelError(f"'{text}': a hub file is written OWNER/REPO/FILE.gguf")
        return ModelSpec("file", f"{repo}/{filename}", repo=repo, filename=filename)
    repo, _, quant = spec.partition(":")
    if not REPO_RE.match(repo):
        raise ModelError(
            f"'{text}' is not a model spec: use NAME[:QUANT] from the catalogue, "
            "OWNER/REPO:QUANT or OWNER/REPO/FILE.gguf"
        )
    quant = _check_quant(quant or DEFAULT_QUANT, text)
    return ModelSpec("repo", f"{repo}:{quant}", repo=repo, quant=quant)


def _check_quant(quant: str, text: str) -> str:
    quant = normalize_quant(quant)
    if not QUANT_RE.match(quant):
        raise ModelError(f"'{text}': '{quant}' is not a quantization name (like Q4_K_M or Q8_0)")
    return quant


def _catalog_spec(spec: str, entries: list[RegistryEntry]) -> ModelSpec:
    name, _, quant = spec.partition(":")
    wanted = name.lower()
    entry = next((e for e in entries if e.name == wanted), None)
    if entry is None:
        raise UnknownModelError(name, close_names(name, [e.name for e in entries]))
    quant = _check_quant(quant, spec) if quant else entry.default_quant
    if entry.source == "package" and quant != entry.default_quant:
        raise ModelError(f"'{entry.name}' ships only as {entry.default_quant}")
    installed = entry.name if quant == entry.default_quant else f"{entry.name}:{quant}"
    return ModelSpec("catalog", installed, repo=entry.repo, quant=quant, entry=entry)


def quant_of_filename(filename: str) -> str | None:
    """The quant label in a GGUF file name, e.g. 'Llama-3.2-1B-Instruct-Q4_K_M.gguf' -> 'Q4_K_M'."""
    found = _QUANT_IN_NAME.findall(_stem(filename))
    return found[-1].upper() if found else None


def matches_quant(filename: str, quant: str) -> bool:
    """Whether `quant` is a whole label in the file name: Q4_0 matches '-Q4_0.gguf' but not
    '-Q4_0_4_4.gguf', Q4_K_M matches 'q4_k_m', and F16 and FP16 are the same thing."""
    wanted = {quant.upper()} | ({"F16", "FP16"} if quant.upper() in ("F16", "FP16") else set())
    stem = _stem(filename)
    return any(re.search(rf"(?:^|[-_.]){re.escape(q)}(?=[-.]|$)", stem, re.IGNORECASE) for q in wanted)


def _stem(filename: str) -> str:
    """Base name without '.gguf' and without a split suffix '-00001-of-00003'."""
    base = filename.rsplit("/", 1)[-1]
    base = re.sub(r"\.gguf$", "", base, flags=re.IGNORECASE)
    return re.sub(r"-\d{5}-of-\d{5}$", "", base)


# Quant labels: Q4_K_M, q8_0, IQ4_XS, Q4_0_4_4, TQ1_0, MXFP4, BF16, FP16, F16, F32.
_QUANT_IN_NAME = re.compile(
    r"(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|TQ\d_\d|MXFP4(?:_MOE)?|BF16|FP16|F16|F32)(?=[-.]|$)",
    re.IGNORECASE,
)
