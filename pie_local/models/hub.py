"""Talking to the Hugging Face hub: repo listing, file metadata, resumable verified downloads.

Built on huggingface_hub's own pieces (endpoint, token and headers, its HTTP session, error
classes) rather than hf_hub_download, because pull needs what that function does not give: a
cancel flag checked between chunks, byte-level progress callbacks, a sha256 computed while the
bytes arrive (and checked before the file is moved into place), and files stored in pie-local's
own directory. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are read at call time.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pie_local.models.errors import (
    DiskFullError,
    HubAuthError,
    HubNotFoundError,
    OfflineError,
    PullCancelled,
    PullError,
)

RETRIES = 5  # reconnects after a dropped connection without progress in between
RETRY_WAIT_S = 1.0  # first wait before a reconnect; doubles up to 8 s
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TOKEN_HELP = (
    "If the repository is gated, accept its terms on its hub page, then create a read token at "
    "https://huggingface.co/settings/tokens and set HF_TOKEN=hf_... (or run `hf auth login`)."
)


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repo
    size: int
    sha256: str | None  # the LFS object id (sha256 of the content); None for files kept in git


@dataclass(frozen=True)
class FileMetadata:
    commit: str | None
    etag: str | None  # X-Linked-Etag for LFS files: their sha256
    size: int | None


# ---------------------------------------------------------------------------------------------
# Errors: huggingface_hub / httpx exceptions -> ModelError subclasses with the fix
# ---------------------------------------------------------------------------------------------


def _translate(exc: Exception, repo: str, filename: str | None = None) -> PullError:
    from huggingface_hub import errors

    httpx = _httpx()

    what = f"{repo}/{filename}" if filename else repo
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return OfflineError(f"cannot download {what}: offline mode is on (HF_HUB_OFFLINE). Unset it to download.")
    if isinstance(exc, errors.GatedRepoError) or status == 403:
        return HubAuthError(f"access to {what} is denied ({status}): the repository is gated or private. {TOKEN_HELP}")
    if isinstance(exc, errors.RepositoryNotFoundError):
        auth = f" {TOKEN_HELP}" if status == 401 else ""
        return HubNotFoundError(
            f"repository {repo} not found on {endpoint()} ({status}). Check the OWNER/REPO spelling.{auth}"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubNotFoundError(f"revision not found in {repo} ({status})")
    if isinstance(exc, errors.EntryNotFoundError) or status == 404:
        return HubNotFoundError(
            f"{what} not found (404). List the repo's files on its hub page, or pull OWNER/REPO:QUANT to pick by quant."
        )
    if status == 401:
        return HubAuthError(f"{what} needs authentication (401). {TOKEN_HELP}")
    if isinstance(exc, (httpx.TransportError, OSError)) and status is None:
        return OfflineError(
            f"cannot reach {endpoint()} ({type(exc).__name__}: {exc}). Check the network connection "
            "(or HF_ENDPOINT if you use a mirror); installed models keep working offline."
        )
    return PullError(f"hub request for {what} failed ({status or type(exc).__name__}): {exc}")


def _httpx():
    """The HTTP library under huggingface_hub's session: httpx2 (hub 2.x) or httpx (hub 1.x)."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx


def _headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    from pie_local import __version__

    return build_hf_headers(library_name="pie-local", library_version=__version__)


# ---------------------------------------------------------------------------------------------
# Listing and metadata
# ---------------------------------------------------------------------------------------------


def list_files(repo: str, revision: str = "main") -> list[RemoteFile]:
    """Every file of a repo with size and LFS sha256: the hub's tree API, recursive, following
    its Link pagination. One attempt per page (HfApi would retry a refused connection for 24 s)."""
    from urllib.parse import quote

    from huggingface_hub.utils import get_session, hf_raise_for_status

    if is_offline():
        raise OfflineError(f"cannot list {repo}: offline mode is on (HF_HUB_OFFLINE). Unset it to download.")
    url: str | None = f"{endpoint()}/api/models/{repo}/tree/{quote(revision, safe='')}"
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    files: list[RemoteFile] = []
    try:
        while url:
            response = get_session().get(url, params=params, headers=_headers(), timeout=CONNECT_TIMEOUT_S)
            hf_raise_for_status(response)
            for item in response.json():
                if item.get("type") == "file":
                    lfs = item.get("lfs") or {}
                    files.append(RemoteFile(item["path"], int(item["size"]), lfs.get("oid")))
            url, params = response.links.get("next", {}).get("url"), None
    except (KeyError, TypeError, ValueError) as exc:
        raise PullError(f"{endpoint()} sent a repo listing for {repo} that pie-local cannot read ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a ModelError with a fix
        raise _translate(exc, repo) from exc
    return files


def file_url(repo: str, filename: str, revision: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, filename, revision=revision, endpoint=endpoint())


def file_metadata(repo: str, filename: str, revision: str = "main") -> FileMetadata:
    """HEAD on the resolve URL: the commit it resolves to, the LFS sha256 (X-Linked-Etag), size."""
    from huggingface_hub import get_hf_file_metadata

    if is_offline():
        raise OfflineError(f"cannot reach the hub for {repo}/{filename}: offline mode is on (HF_HUB_OFFLINE)")
    try:
        meta = get_hf_file_metadata(
            file_url(repo, filename, revision), headers=_headers(), timeout=CONNECT_TIMEOUT_S, endpoint=endpoint()
        )
    except Exception as exc:  # noqa: BLE001
        raise _translate(exc, repo, filename) from exc
    return FileMetadata(meta.commit_hash, meta.etag, meta.size)


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------


def _hash_existing(path: Path, cancel: threading.Event | None):  # -> a hashlib sha256 object
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            if cancel is not None and cancel.is_set():
                raise PullCancelled(f"cancelled; partial download kept at {path}")
            digest.update(block)
    return digest


def download(
    repo: str,
    filename: str,
    revision: str,
    part: Path,
    size: int,
    *,
    on_bytes: Callable[[int], None],
    cancel: threading.Event | None = None,
) -> str:
    """Download one file into `part`, resuming from the bytes already there with a Range
    request, reconnecting after dropped connections. Returns the sha256 of the whole file.
    `on_bytes(n)` reports the bytes of this file now on disk."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    httpx = _httpx()

    url = file_url(repo, filename, revision)
    if part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the file: not a prefix of it
    part.touch()
    done = part.stat().st_size
    digest = _hash_existing(part, cancel) if done else hashlib.sha256()
    on_bytes(done)
    failures, wait = 0, RETRY_WAIT_S
    with open(part, "r+b", buffering=0) as out:  # unbuffered: a failed write leaves nothing pending
        out.seek(done)
        while done < size:
            headers = _headers()
            if done:
                headers["Range"] = f"bytes={done}-"
            started_at = done
            try:
                with get_session().stream(
                    "GET",
                    url,
                    headers=headers,
                    follow_redirects=True,
                    timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                ) as response:
                    if response.status_code >= 500:
                        raise httpx.RemoteProtocolError(f"server error {response.status_code}")
                    try:
                        hf_raise_for_status(response)
                    except Exception as exc:  # noqa: BLE001 - 401/403/404...: not worth retrying
                        raise _translate(exc, repo, filename) from exc
                    if done and response.status_code != 206:  # the server ignored Range: start over
                        out.seek(0)
                        out.truncate()
                        done, digest = 0, hashlib.sha256()
                        on_bytes(0)
                    for chunk in response.iter_bytes():  # as received: a drop loses no bytes
                        if cancel is not None and cancel.is_set():
                            raise PullCancelled(f"cancelled; {done} bytes kept in {part} for the next pull to resume")
                        _write(out, chunk, part, size - done)
                        digest.update(chunk)
                        done += len(chunk)
                        on_bytes(done)
            except httpx.TransportError as exc:  # dropped connection, timeout: reconnect and resume
                if done > started_at:
                    failures, wait = 0, RETRY_WAIT_S
                failures += 1
                if failures > RETRIES and done == 0:
                    raise _translate(exc, repo, filename) from exc
                if failures > RETRIES:
                    raise PullError(
                        f"the connection for {repo}/{filename} kept dropping ({type(exc).__name__}: {exc}); "
                        f"{done} of {size} bytes are kept in {part}: run the same pull again to resume"
                    ) from exc
                time.sleep(wait)
                wait = min(wait * 2, 8.0)
                continue
            if done == started_at:  # a clean but empty response: do not loop forever
                failures += 1
                if failures > RETRIES:
                    raise PullError(f"{repo}/{filename}: the server keeps sending no data at byte {done} of {size}")
        out.flush()
        os.fsync(out.fileno())
    if done != size:
        raise PullError(f"{repo}/{filename}: got {done} bytes, expected {size}")
    return digest.hexdigest()


def _write(out, chunk: bytes, part: Path, remaining: int) -> None:
    view = memoryview(chunk)
    try:
        while view:
            view = view[out.write(view) :]  # raw writes may be short
    except OSError as exc:
        import errno

        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk full while writing {part}: {remaining / 1e9:.2f} GB more are needed. Free space "
                f"and run the same pull again to resume (the partial file is kept), or delete {part}."
            ) from None
        raise
