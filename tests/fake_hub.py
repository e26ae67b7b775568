"""A local stand-in for the Hugging Face hub, speaking the protocol huggingface_hub uses.

    GET  /api/models/OWNER/REPO/tree/REV?recursive=...   listing with sizes and LFS sha256
    HEAD /OWNER/REPO/resolve/REV/FILE   LFS files: 302 to the CDN with X-Repo-Commit,
                                        X-Linked-Etag (sha256), X-Linked-Size, ETag
    GET  /OWNER/REPO/resolve/REV/FILE   same redirect; the CDN serves bytes with Range support
    GET  /cdn/SHA256                    on "localhost" instead of "127.0.0.1": another origin, as
                                        the real CDN is (huggingface_hub stops HEAD redirects there)

Errors carry X-Error-Code like the hub's (RepoNotFound, EntryNotFound, GatedRepo). Faults for
tests: drop a connection after N bytes, corrupt served bytes, hide a listed file. Counters record
every request and the body bytes sent per file.

Also here: write_gguf(), a tiny valid GGUF written with the gguf package.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "c0ffee" * 6 + "c0ff"  # 40 hex digits
    gated_token: str | None = None  # when set, requests need "Authorization: Bearer <token>"
    corrupt: set[str] = field(default_factory=set)  # served with one byte flipped (listing unchanged)
    hidden: set[str] = field(default_factory=set)  # listed, but resolve answers 404


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(".gguf")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client hanging up mid-transfer (a cancelled pull) is expected, not an error."""


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the HF_ENDPOINT to use."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.bytes_served: dict[str, int] = {}  # file path in repo -> body bytes sent
        self.drop_after: dict[str, int] = {}  # file path -> close the connection after N bytes (once)
        self.ignore_range = False
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}/cdn"

    def add_repo(self, repo_id: str, files: dict[str, bytes], **kwargs) -> FakeRepo:
        repo = FakeRepo(files=dict(files), **kwargs)
        self.repos[repo_id] = repo
        return repo

    def gets(self, filename: str) -> list[str | None]:
        """Range headers of the GETs that fetched `filename`'s bytes from the CDN."""
        sha = self._sha_of(filename)
        return [rng for method, path, rng in self.requests if method == "GET" and path == f"/cdn/{sha}"]

    def _sha_of(self, filename: str) -> str | None:
        for repo in self.repos.values():
            if filename in repo.files:
                return sha256(repo.files[filename])
        return None

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -----------------------------------------------------------------------------------------

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._route(head=True)

            def do_GET(self) -> None:
                self._route(head=False)

            # -- routing --------------------------------------------------------------------

            def _route(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Range")))
                if m := re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path):
                    return self._tree(m[1], m[3] or "")
                if m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
                    return self._resolve(m[1], m[2], m[3])
                if m := re.match(r"^/cdn/([0-9a-f]{64})$", path):
                    return self._cdn(m[1], head)
                self._error(404, "EntryNotFound", "no such endpoint")

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo_id: str) -> FakeRepo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
                    return None
                if repo.gated_token is not None:
                    auth = self.headers.get("Authorization")
                    if auth is None:
                        self._error(
                            401, "GatedRepo", f"Access to model {repo_id} is restricted. You must be authenticated."
                        )
                        return None
                    if auth != f"Bearer {repo.gated_token}":
                        self._error(
                            403,
                            "GatedRepo",
                            f"Access to model {repo_id} is restricted and you are not in the authorized list.",
                        )
                        return None
                return repo

            # -- endpoints ------------------------------------------------------------------

            def _tree(self, repo_id: str, prefix: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                items, folders = [], set()
                for path, data in sorted(repo.files.items()):
                    if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                        continue
                    parts = path.split("/")
                    folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                    item = {"type": "file", "oid": _git_oid(data), "size": len(data), "path": path}
                    if _is_lfs(path):
                        item["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
                    items.append(item)
                items += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
                body = json.dumps(items).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if revision not in ("main", repo.commit):
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                if filename not in repo.files or filename in repo.hidden:
                    return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
                data = repo.files[filename]
                self.send_response(302 if _is_lfs(filename) else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("Content-Length", "0" if _is_lfs(filename) else str(len(data)))
                if _is_lfs(filename):
                    self.send_header("ETag", f'"{_git_oid(data)}"')
                    self.send_header("X-Linked-Etag", f'"{sha256(data)}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Location", f"{hub.cdn_url}/{sha256(data)}")
                    self.end_headers()
                else:
                    self.send_header("ETag", f'"{_git_oid(data)}"')
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(data)

            def _cdn(self, sha: str, head: bool) -> None:
                found = [(r, p) for r in hub.repos.values() for p, d in r.files.items() if sha256(d) == sha]
                if not found:
                    return self._error(404, "EntryNotFound", "no such object")
                repo, filename = found[0]
                data = repo.files[filename]
                if filename in repo.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                rng = self.headers.get("Range")
                if rng and not hub.ignore_range:
                    m = re.match(r"^bytes=(\d+)-$", rng)
                    start = int(m[1]) if m else 0
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{sha}"')
                self.end_headers()
                if head:
                    return
                with hub._lock:
                    cut = hub.drop_after.pop(filename, None)
                if cut is not None:  # the connection drops mid-body
                    body = body[:cut]
                self.wfile.write(body)
                self.wfile.flush()
                with hub._lock:
                    hub.bytes_served[filename] = hub.bytes_served.get(filename, 0) + len(body)
                if cut is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)

        return Handler


# ---------------------------------------------------------------------------------------------
# Tiny GGUF models
# ---------------------------------------------------------------------------------------------


def _spm_tokens(n: int) -> list[bytes]:
    """<unk> <s> </s>, the 256 byte tokens SentencePiece falls back to, then filler up to n."""
    base = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    if n < len(base):
        raise ValueError(f"a SentencePiece vocabulary needs at least {len(base)} tokens, not {n}")
    return base + [f"tok{i}".encode() for i in range(n - len(base))]


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str = "Tiny Test",
    n_layers: int = 2,
    n_embd: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    context_length: int = 256,
    vocab: int = 300,
    pad_bytes: int = 0,
    chat_template: str | None = None,
    license: str | None = "apache-2.0",
    seed: int = 0,
    split: tuple[int, int] | None = None,  # (part number, part count): split.* keys as llama.cpp writes
) -> Path:
    """A small but valid GGUF: llama-style metadata, a SentencePiece token list (`vocab` tokens,
    byte tokens included), F32 + F16 + Q8_0 tensors, and `pad_bytes` of extra F32 weights to make
    downloads long enough to interrupt."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    if license:
        w.add_license(license)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_embd * 2)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(_spm_tokens(vocab))
    if chat_template:
        w.add_chat_template(chat_template)
    if split:
        w.add_uint16("split.no", split[0] - 1)
        w.add_uint16("split.count", split[1])
        w.add_int32("split.tensors.count", 3 * split[1])
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, n_embd)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    q = gguf.quants.quantize(rng.standard_normal((n_embd, n_embd)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    if pad_bytes:
        w.add_tensor("pad.weight", rng.standard_normal(pad_bytes // 4).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
