"""pull against a local hub (tests/fake_hub.py) with HF_ENDPOINT pointing at it."""

from __future__ import annotations

import errno
import io
import threading
from pathlib import Path

import pytest
from fake_hub import FakeHub, sha256, write_gguf

from pie_local.models import (
    ChecksumError,
    DiskFullError,
    HubAuthError,
    HubNotFoundError,
    OfflineError,
    PullCancelled,
    PullError,
    QuantNotFoundError,
    resolve_model,
    store,
)
from pie_local.models import hub as hub_module
from pie_local.models.pull import PullProgress, pull
from pie_local.models.registry import find_entry, is_verified, pulled_entries
from pie_local.paths import home, models_dir

REPO = "test-org/Tiny-Chat-GGUF"
PAD = 1 << 20  # ~1 MiB files: several 256 KiB chunks, so a download can be cut mid-file


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Distinct tiny GGUFs (distinct bytes, so distinct sha256) by quant label."""
    out = tmp_path_factory.mktemp("ggufs")
    files = {}
    for seed, quant in enumerate(["Q4_K_M", "Q8_0", "Q4_0", "Q4_0_4_4", "IQ4_XS", "F16"]):
        files[quant] = write_gguf(out / f"{quant}.gguf", seed=seed, pad_bytes=PAD, name=f"Tiny {quant}").read_bytes()
    return files


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gguf_bytes: dict[str, bytes]):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(hub_module, "RETRY_WAIT_S", 0.01)
        hub.add_repo(
            REPO,
            {
                "Tiny-Chat-Q4_K_M.gguf": gguf_bytes["Q4_K_M"],
                "Tiny-Chat-Q8_0.gguf": gguf_bytes["Q8_0"],
                "Tiny-Chat-Q4_0.gguf": gguf_bytes["Q4_0"],
                "Tiny-Chat-Q4_0_4_4.gguf": gguf_bytes["Q4_0_4_4"],
                "Tiny-Chat-IQ4_XS.gguf": gguf_bytes["IQ4_XS"],
                "mmproj-Tiny-Chat-F16.gguf": gguf_bytes["F16"],
                "README.md": b"# Tiny chat\n",
            },
        )
        yield hub


def user_catalog(text: str) -> None:
    (home() / "models.toml").write_text(text)


TINY_ENTRY = f"""
[[models]]
name = "tiny-chat"
description = "test model"
repo = "{REPO}"
quants = ["Q4_K_M", "Q8_0"]
arch = "llama"
context_length = 256
license = "apache-2.0"
"""


# ---------------------------------------------------------------------------------------------
# full pull, quant selection, catalogue names
# ---------------------------------------------------------------------------------------------


def test_full_pull_by_repo_and_quant(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    events: list[PullProgress] = []
    model = pull(f"{REPO}:q8_0", progress=events.append)

    assert model.name == f"{REPO}:Q8_0"
    assert model.path == models_dir() / "hub" / REPO / "Tiny-Chat-Q8_0.gguf"
    assert model.path.read_bytes() == gguf_bytes["Q8_0"]
    assert model.files[0].sha256 == sha256(gguf_bytes["Q8_0"]) and model.files[0].owned
    assert (model.source, model.quant, model.arch, model.context_length) == ("hub", "Q8_0", "llama", 256)
    assert model.revision == fake_hub.repos[REPO].commit
    assert store.get(model.name) == model
    assert not list(model.path.parent.glob("*.part*"))
    # one GET of the bytes, pinned to the commit the HEAD returned
    assert fake_hub.gets("Tiny-Chat-Q8_0.gguf") == [None]
    assert ("GET", f"/{REPO}/resolve/{model.revision}/Tiny-Chat-Q8_0.gguf", None) in fake_hub.requests
    # progress: resolving first, done last, bytes never going backwards, ending at the size
    assert events[0].phase == "resolving" and events[-1].phase == "done"
    downloading = [e.done_bytes for e in events if e.phase == "downloading"]
    assert downloading == sorted(downloading) and downloading[-1] == len(gguf_bytes["Q8_0"])
    assert events[-1].total_bytes == len(gguf_bytes["Q8_0"]) and events[-1].fraction == 1.0


def test_pull_again_is_a_no_op(fake_hub: FakeHub) -> None:
    first = pull(f"{REPO}:Q8_0")
    n_requests = len(fake_hub.requests)
    assert pull(f"{REPO}:Q8_0") == first
    assert len(fake_hub.requests) == n_requests


@pytest.mark.parametrize(
    ("quant", "filename"),
    [("Q4_K_M", "Tiny-Chat-Q4_K_M.gguf"), ("Q4_0", "Tiny-Chat-Q4_0.gguf"), ("iq4_xs", "Tiny-Chat-IQ4_XS.gguf")],
)
def test_quant_selection_from_listing(fake_hub: FakeHub, quant: str, filename: str) -> None:
    # Q4_0 must not pick Q4_0_4_4; mmproj (vision projector) files are never the model
    assert pull(f"{REPO}:{quant}").path.name == filename


def test_default_quant_is_q4_k_m(fake_hub: FakeHub) -> None:
    model = pull(REPO)
    assert model.name == f"{REPO}:Q4_K_M" and model.path.name == "Tiny-Chat-Q4_K_M.gguf"


def test_missing_quant_lists_what_the_repo_has(fake_hub: FakeHub) -> None:
    with pytest.raises(QuantNotFoundError) as err:
        pull(f"{REPO}:Q6_K")
    message = str(err.value)
    assert "no Q6_K" in message
    for quant in ("IQ4_XS", "Q4_0", "Q4_K_M", "Q8_0"):
        assert quant in message


def test_ambiguous_quant_asks_for_a_file(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    fake_hub.repos[REPO].files["other/Tiny-Chat-v2-Q8_0.gguf"] = gguf_bytes["F16"]
    with pytest.raises(QuantNotFoundError, match="several files .* match Q8_0"):
        pull(f"{REPO}:Q8_0")


def test_catalogue_name_and_quant(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    user_catalog(TINY_ENTRY)
    default = pull("tiny-chat")
    other = pull("Tiny-Chat:q8_0")
    assert (default.name, default.path.name) == ("tiny-chat", "Tiny-Chat-Q4_K_M.gguf")
    assert (other.name, other.path.name) == ("tiny-chat:Q8_0", "Tiny-Chat-Q8_0.gguf")
    resolved = resolve_model("tiny-chat:Q4_K_M")
    assert resolved.name == "tiny-chat" and resolved.path == default.path and resolved.arch == "llama"


def test_first_pull_of_an_unverified_entry_verifies_it(fake_hub: FakeHub) -> None:
    user_catalog(TINY_ENTRY.replace('quants = ["Q4_K_M", "Q8_0"]', 'quants = ["Q4_K_M", "Q6_K"]'))
    entry = find_entry("tiny-chat")
    assert entry is not None and not entry.verified and not is_verified(entry)
    with pytest.raises(QuantNotFoundError) as err:  # models.toml lists a quant the hub does not have
        pull("tiny-chat:Q6_K")
    assert str(err.value).startswith(f"{REPO} has no Q6_K GGUF. Quants there: IQ4_XS, Q4_0, Q4_0_4_4, Q4_K_M, Q8_0")
    assert "pie-local pull tiny-chat:IQ4_XS" in str(err.value)
    assert not is_verified(entry) and pulled_entries() == {}  # a failed pull confirms nothing
    pull("tiny-chat")
    assert pulled_entries() == {"tiny-chat": {"repo": REPO, "files": {"Q4_K_M": "Tiny-Chat-Q4_K_M.gguf"}}}
    assert is_verified(entry)
    assert cli_catalog()["tiny-chat"]["verified"] is True
    user_catalog(TINY_ENTRY.replace(REPO, "other-org/Tiny-GGUF"))  # the name moved to another repo
    assert not is_verified(find_entry("tiny-chat")) and cli_catalog()["tiny-chat"]["verified"] is False


def cli_catalog() -> dict[str, dict]:
    import contextlib
    import json

    from pie_local.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list", "--catalog", "--json"]) == 0
    return {row["name"]: row for row in json.loads(out.getvalue())}


def test_pull_by_file_path(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    model = pull(f"https://huggingface.co/{REPO}/blob/main/Tiny-Chat-Q4_0.gguf")
    assert model.name == f"{REPO}/Tiny-Chat-Q4_0.gguf"
    assert model.quant == "Q4_0" and model.path.read_bytes() == gguf_bytes["Q4_0"]


# ---------------------------------------------------------------------------------------------
# interruption and resume
# ---------------------------------------------------------------------------------------------


def test_dropped_connection_resumes_without_refetching(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    size = len(gguf_bytes["Q8_0"])
    fake_hub.drop_after["Tiny-Chat-Q8_0.gguf"] = 300_000
    model = pull(f"{REPO}:Q8_0")
    assert model.path.read_bytes() == gguf_bytes["Q8_0"]
    assert fake_hub.gets("Tiny-Chat-Q8_0.gguf") == [None, "bytes=300000-"]
    assert fake_hub.bytes_served["Tiny-Chat-Q8_0.gguf"] == size  # not one byte twice


def test_failed_pull_keeps_partial_and_next_pull_resumes(
    fake_hub: FakeHub, gguf_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    size = len(gguf_bytes["Q8_0"])
    monkeypatch.setattr(hub_module, "RETRIES", 0)
    fake_hub.drop_after["Tiny-Chat-Q8_0.gguf"] = 400_000
    with pytest.raises(PullError, match="400000 of .* bytes are kept .* run the same pull again to resume"):
        pull(f"{REPO}:Q8_0")
    part = models_dir() / "hub" / REPO / "Tiny-Chat-Q8_0.gguf.part"
    assert part.stat().st_size == 400_000
    assert store.get(f"{REPO}:Q8_0") is None  # nothing installed from a partial file

    model = pull(f"{REPO}:Q8_0")
    assert model.path.read_bytes() == gguf_bytes["Q8_0"]
    assert fake_hub.gets("Tiny-Chat-Q8_0.gguf") == [None, "bytes=400000-"]
    assert fake_hub.bytes_served["Tiny-Chat-Q8_0.gguf"] == size
    assert not part.exists()


def test_cancel_keeps_partial_and_resume_fetches_only_the_rest(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    cancel = threading.Event()

    def stop_after_some_bytes(p: PullProgress) -> None:
        if p.phase == "downloading" and p.done_bytes >= 256 * 1024:
            cancel.set()

    with pytest.raises(PullCancelled):
        pull(f"{REPO}:Q8_0", progress=stop_after_some_bytes, cancel=cancel)
    part = models_dir() / "hub" / REPO / "Tiny-Chat-Q8_0.gguf.part"
    kept = part.stat().st_size
    assert 0 < kept < len(gguf_bytes["Q8_0"])

    model = pull(f"{REPO}:Q8_0")
    assert model.path.read_bytes() == gguf_bytes["Q8_0"]
    assert fake_hub.gets("Tiny-Chat-Q8_0.gguf") == [None, f"bytes={kept}-"]
    # the resumed request carried exactly the bytes that were missing
    assert fake_hub.requests[-1][2] == f"bytes={kept}-"


def test_server_ignoring_range_restarts_cleanly(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    fake_hub.drop_after["Tiny-Chat-Q8_0.gguf"] = 300_000
    fake_hub.ignore_range = True
    model = pull(f"{REPO}:Q8_0")
    assert model.path.read_bytes() == gguf_bytes["Q8_0"]


def test_two_pulls_of_one_file_download_it_once(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    results, errors = [], []

    def run() -> None:
        try:
            results.append(pull(f"{REPO}:Q8_0"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 2
    assert results[0].path == results[1].path
    assert fake_hub.bytes_served["Tiny-Chat-Q8_0.gguf"] == len(gguf_bytes["Q8_0"])


# ---------------------------------------------------------------------------------------------
# verification and errors
# ---------------------------------------------------------------------------------------------


def test_checksum_mismatch_installs_nothing(fake_hub: FakeHub) -> None:
    fake_hub.repos[REPO].corrupt.add("Tiny-Chat-Q8_0.gguf")
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        pull(f"{REPO}:Q8_0")
    folder = models_dir() / "hub" / REPO
    assert not (folder / "Tiny-Chat-Q8_0.gguf").exists()
    assert not list(folder.glob("*.part*"))  # a corrupt partial is not kept for resume
    assert store.get(f"{REPO}:Q8_0") is None


def test_sha256_pin_in_catalogue_is_checked_before_download(fake_hub: FakeHub) -> None:
    user_catalog(TINY_ENTRY + '\n[models.pins.Q4_K_M]\nsha256 = "' + "ab" * 32 + '"\n')
    with pytest.raises(ChecksumError, match="changed upstream"):
        pull("tiny-chat")
    assert fake_hub.gets("Tiny-Chat-Q4_K_M.gguf") == []


def test_file_pin_missing_from_listing(fake_hub: FakeHub) -> None:
    user_catalog(TINY_ENTRY + '\n[models.pins.Q4_K_M]\nfile = "Tiny-Chat-OLD-Q4_K_M.gguf"\n')
    with pytest.raises(HubNotFoundError, match="pins 'Tiny-Chat-OLD-Q4_K_M.gguf'.*Update the pin"):
        pull("tiny-chat")


def test_404_unknown_repo(fake_hub: FakeHub) -> None:
    with pytest.raises(HubNotFoundError, match="repository test-org/Nope-GGUF not found.*spelling"):
        pull("test-org/Nope-GGUF:Q4_K_M")


def test_404_file_gone_after_listing(fake_hub: FakeHub) -> None:
    fake_hub.repos[REPO].hidden.add("Tiny-Chat-Q8_0.gguf")
    with pytest.raises(HubNotFoundError, match="404"):
        pull(f"{REPO}:Q8_0")


def test_404_file_spec_not_in_repo(fake_hub: FakeHub) -> None:
    with pytest.raises(HubNotFoundError, match="no file 'nope.gguf'.*Tiny-Chat-Q8_0.gguf"):
        pull(f"{REPO}/nope.gguf")


def test_401_gated_repo_says_how_to_authenticate(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.repos[REPO].gated_token = "hf_secret"
    with pytest.raises(HubAuthError, match="HF_TOKEN") as err:
        pull(f"{REPO}:Q8_0")
    assert "gated" in str(err.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubAuthError, match="403"):
        pull(f"{REPO}:Q8_0")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull(f"{REPO}:Q8_0").path.is_file()


def test_offline_mode(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = pull(f"{REPO}:Q8_0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n_requests = len(fake_hub.requests)
    assert pull(f"{REPO}:Q8_0") == installed  # installed: fine offline
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE"):
        pull(f"{REPO}:Q4_K_M")
    assert len(fake_hub.requests) == n_requests


def test_unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(OfflineError, match="cannot reach http://127.0.0.1:9"):
        pull(f"{REPO}:Q8_0")


def test_not_enough_disk_space_is_caught_before_downloading(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from pie_local.models import pull as pull_module

    usage = shutil.disk_usage(models_dir())
    monkeypatch.setattr(pull_module.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(DiskFullError, match=r"needs 0\.00 GB .* PIE_LOCAL_HOME"):
        pull(f"{REPO}:Q8_0")
    assert fake_hub.gets("Tiny-Chat-Q8_0.gguf") == []


def test_disk_full_mid_download_keeps_partial_for_resume(
    fake_hub: FakeHub, gguf_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = open

    class FillsUp(io.FileIO):
        def write(self, data):  # the disk fills at 512 KiB: a short write, then ENOSPC
            room = 512 * 1024 - self.tell()
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data[:room])

    monkeypatch.setattr(hub_module, "open", lambda path, mode, **_: FillsUp(path, mode.replace("b", "")), raising=False)
    with pytest.raises(DiskFullError, match="GB more are needed.*resume"):
        pull(f"{REPO}:Q8_0")
    part = models_dir() / "hub" / REPO / "Tiny-Chat-Q8_0.gguf.part"
    assert part.stat().st_size == 512 * 1024
    monkeypatch.setattr(hub_module, "open", real_open, raising=False)
    assert pull(f"{REPO}:Q8_0").path.read_bytes() == gguf_bytes["Q8_0"]
    assert fake_hub.gets("Tiny-Chat-Q8_0.gguf")[-1] == f"bytes={512 * 1024}-"


# ---------------------------------------------------------------------------------------------
# split files, HF cache reuse, rm
# ---------------------------------------------------------------------------------------------


def test_split_gguf_is_pulled_whole(fake_hub: FakeHub, tmp_path: Path) -> None:
    parts = {
        f"Q4_K_M/Big-Q4_K_M-0000{i}-of-00002.gguf": write_gguf(
            tmp_path / f"p{i}.gguf", seed=10 + i, pad_bytes=PAD, split=(i, 2)
        ).read_bytes()
        for i in (1, 2)
    }
    fake_hub.add_repo("test-org/Big-GGUF", parts)
    model = pull("test-org/Big-GGUF:Q4_K_M")
    assert [f.path.name for f in model.files] == ["Big-Q4_K_M-00001-of-00002.gguf", "Big-Q4_K_M-00002-of-00002.gguf"]
    assert model.path == model.files[0].path
    for f in model.files:
        assert f.path.read_bytes() == parts[f"Q4_K_M/{f.path.name}"]
    assert model.size == sum(len(b) for b in parts.values())

    from pie_local.models.gguf_info import read_gguf_info

    assert read_gguf_info(model.path).n_tensors == 8  # 4 tensors in each part


def test_incomplete_split_on_the_hub_is_an_error(fake_hub: FakeHub, gguf_bytes: dict[str, bytes]) -> None:
    fake_hub.add_repo("test-org/Half-GGUF", {"Half-Q8_0-00001-of-00003.gguf": gguf_bytes["Q8_0"]})
    with pytest.raises(HubNotFoundError, match="incomplete.*00002-of-00003"):
        pull("test-org/Half-GGUF:Q8_0")


def test_file_in_hf_cache_is_reused_not_downloaded(
    fake_hub: FakeHub, gguf_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    data = gguf_bytes["Q8_0"]
    commit = fake_hub.repos[REPO].commit
    repo_dir = tmp_path / "hf_home" / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "blobs" / sha256(data)).write_bytes(data)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "snapshots" / commit / "Tiny-Chat-Q8_0.gguf").symlink_to(f"../../blobs/{sha256(data)}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)

    model = pull(f"{REPO}:Q8_0")
    assert fake_hub.gets("Tiny-Chat-Q8_0.gguf") == []
    assert model.path == repo_dir / "snapshots" / commit / "Tiny-Chat-Q8_0.gguf"
    assert not model.files[0].owned
    removal = store.remove(model.name)
    assert removal.deleted == () and model.path.read_bytes() == data  # rm never deletes the HF cache


def test_rm_deletes_downloads_but_not_files_another_name_uses(fake_hub: FakeHub) -> None:
    user_catalog(TINY_ENTRY)
    a = pull("tiny-chat")
    b = pull(f"{REPO}:Q4_K_M")  # same file, second name: no second download
    assert a.path == b.path and fake_hub.gets("Tiny-Chat-Q4_K_M.gguf") == [None]
    first = store.remove("tiny-chat")
    assert first.deleted == () and first.kept == (a.path,) and a.path.is_file()
    second = store.remove(b.name)
    assert second.deleted == (b.path,) and not b.path.exists()
    assert not (models_dir() / "hub" / "test-org").exists()  # empty folders pruned


def test_progress_reports_speed_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from pie_local.models import pull as pull_module

    clock = iter([0.0, 1.0, 2.0, 3.0])
    monkeypatch.setattr(pull_module.time, "monotonic", lambda: next(clock))
    events: list[PullProgress] = []
    report = pull_module._Reporter("m", events.append)
    report.total, report.file_count = 4_000_000, 1
    for done in (0, 1_000_000, 2_000_000, 3_000_000):  # 1 MB/s
        report("downloading", "m.gguf", 0, done)
    last = events[-1]
    assert last.speed == pytest.approx(1_000_000) and last.eta == pytest.approx(1.0)
    assert last.fraction == 0.75 and events[0].speed is None
