"""Named snapshots on FakeDriver: save, restart the engine, open, continue identically without re-prefill."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from pie_local import paths
from pie_local.driver.fake import FakeDriver
from pie_local.driver.types import DriverParams
from pie_local.runtime import Engine, SamplingParams
from pie_local.models import store
from pie_local.models.store import InstalledModel, ModelFile
from pie_local.runtime import snapshots
from pie_local.runtime.snapshots import SnapshotError, delete_snapshot, list_snapshots
from runtime_helpers import fake_engine


def make_engine(page_size: int = 4) -> tuple[Engine, FakeDriver]:
    driver = FakeDriver(DriverParams(page_size=page_size, n_pages=64, max_batch_tokens=64))
    return fake_engine(driver), driver


async def test_snapshot_survives_a_restart_without_reprefill():
    prompt = "a long system prompt that we do not want to prefill twice"
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill(prompt)
        await ctx.generate(max_tokens=5)
        await ctx.save("warm")
        tokens_at_save = ctx.token_ids
        expected = await ctx.generate(SamplingParams(temperature=0.8, seed=11), max_tokens=8)

    engine, driver = make_engine()  # a new engine: empty KV pool
    async with engine:
        restored = await engine_open(engine, "warm")
        assert restored.token_ids == tokens_at_save and restored.n_pending == 1
        assert driver.stats.pages_written == restored.n_pages == -(-restored.kv_len // 4)
        got = await restored.generate(SamplingParams(temperature=0.8, seed=11), max_tokens=8)
        assert got == expected
        assert driver.stats.tokens == 8  # the pending token + 7 decode steps; no prompt token again


async def engine_open(engine, name):
    from pie_local.runtime import Context

    return await Context.open(engine, name)


async def test_snapshot_pages_join_the_prefix_cache_and_chat_state_is_kept():
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.system("You are terse.")
        ctx.user("hello")
        await ctx.flush()
        await ctx.save("chat")
    engine, driver = make_engine()
    async with engine:
        restored = await engine_open(engine, "chat")
        assert [m["role"] for m in restored.messages] == ["system", "user"]
        other = engine.context()
        other.system("You are terse.")
        other.user("hello")
        await other.flush()
        assert driver.stats.tokens == len(other) % 4  # only the partial tail page was computed
        restored.user("more")  # the conversation continues incrementally
        assert restored.text.endswith("<start_of_turn>user\nmore<end_of_turn>\n")


async def test_snapshot_from_another_model_layout_is_refused():
    engine, _ = make_engine(page_size=4)
    async with engine:
        ctx = engine.context()
        ctx.fill("abc")
        await ctx.flush()
        await ctx.save("small-pages")
    engine, _ = make_engine(page_size=8)
    async with engine:
        with pytest.raises(SnapshotError, match="page_size"):
            await engine_open(engine, "small-pages")
        with pytest.raises(SnapshotError, match="no snapshot named"):
            await engine_open(engine, "missing")
        with pytest.raises(SnapshotError, match="bad snapshot name"):
            await engine_open(engine, "../etc/passwd")


async def test_corrupt_snapshot_is_a_clear_error_and_listing_works():
    engine, _ = make_engine()
    async with engine:
        ctx = engine.context()
        ctx.fill("abcdefghij")
        await ctx.flush()
        path = await ctx.save("s1")
        assert [s["name"] for s in list_snapshots()] == ["s1"]
        assert not list(paths.snapshots_dir().glob(".*tmp*"))  # no temporary file left behind
        data = path.read_bytes()
        path.write_bytes(data[:-10])
        with pytest.raises(SnapshotError, match="truncated"):
            await engine_open(engine, "s1")
        path.write_bytes(b"garbage")
        with pytest.raises(SnapshotError, match="not a pie-local snapshot"):
            await engine_open(engine, "s1")
        delete_snapshot("s1")
        assert list_snapshots() == []


# ---- the model file's sha256 (snapshot identity) ---------------------------------------------------

def _forbid_hashing(monkeypatch) -> None:
    def refuse(*_args):
        raise AssertionError("the model file was hashed")

    monkeypatch.setattr(snapshots.hashlib, "sha256", refuse)


def test_model_sha256_uses_the_store_record_while_the_file_is_unchanged(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(1000))
    true_sha = hashlib.sha256(model.read_bytes()).hexdigest()
    recorded = "ab" * 32  # differs from the real hash: proves the record is what was used
    store.record(InstalledModel(name="m", files=(ModelFile(model, 1004, recorded, owned=False),), source="hub"))
    with monkeypatch.context() as m:
        _forbid_hashing(m)
        assert snapshots.model_sha256(model) == recorded

    later = time.time() + 60  # modified after it was recorded: the record no longer vouches for it
    os.utime(model, (later, later))
    assert snapshots.model_sha256(model) == true_sha
    model.write_bytes(b"GGUF" + bytes(999))  # another size
    assert snapshots.model_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest()


def test_model_sha256_hashes_an_unknown_file_once(tmp_path, monkeypatch):
    model = tmp_path / "local.gguf"
    model.write_bytes(b"GGUF" + bytes(4096))
    digest = snapshots.model_sha256(model)
    assert digest == hashlib.sha256(model.read_bytes()).hexdigest()
    with monkeypatch.context() as m:
        _forbid_hashing(m)
        assert snapshots.model_sha256(model) == digest  # remembered by (path, size, mtime)
    model.write_bytes(b"GGUF" + bytes(4095) + b"x")  # same size, new content and mtime
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    assert snapshots.model_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest() != digest
