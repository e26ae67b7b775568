"""Layers on ggml RPC workers: two `pie-local worker` processes on loopback take part of a model
whose embeddings (and here its first layers) stay on the local CPU.

The workers run ggml's CPU backend, the same kernels on the same inputs as a local run: the split
changes where a product is computed, not how, so the logits must be equal bit for bit
(measured: max |diff| 0 on every comparison below). A worker killed between or during passes
fails the calls of the model that used it, with its address, within seconds: never a crash of
this process (ggml's RPC client aborts on a dropped connection) and never a hang.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from driver_helpers import Req, SeqState, build_batch, tiny_gguf
from rpc_helpers import free_port, other_version_peer, workers
from tiny_models import tiny_config

from pie_local.driver import Driver, DriverError, DriverParams, rpc
from pie_local.driver.driver import plan_devices

pytestmark = [pytest.mark.real_driver, pytest.mark.timeout(240)]

PAGE = 8


def test_the_installed_ggml_has_the_rpc_backend() -> None:
    # The README's install builds llama-cpp-python with -DGGML_RPC=ON; without it nothing here runs.
    assert rpc.available(), f"no RPC backend in this ggml; install it with: {rpc.INSTALL_HINT}"
    major, _minor, _patch = (int(x) for x in rpc.protocol_version().split("."))
    assert major >= 1


@pytest.fixture(scope="module")
def two_workers():
    with workers(2) as ws:
        yield ws


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory):
    return tiny_gguf(tmp_path_factory, "gemma3", "q8_0")  # 6 layers, tied head, sliding window


def _params(**kw) -> DriverParams:
    # plain weights: a worker's layers multiply the file's layout (ggml's RPC server has no repacked
    # buffer type), so the local run compared bit for bit holds its weights the same way
    return DriverParams(n_threads=1, page_size=PAGE, n_pages=16, repack=False, own_kernels=False, **kw)


def _generate(drv: Driver, prompt: list[int], steps: int) -> list[np.ndarray]:
    """Logits of a prefill then `steps` greedy decode steps."""
    seq = SeqState(page_pool=list(range(16)), page_size=PAGE)
    out = []
    tokens = prompt
    for _ in range(steps + 1):
        res = drv.forward(build_batch([seq.req(tokens)], PAGE))
        seq.advance(tokens)
        out.append(res.logits[0].copy())
        tokens = [int(res.tokens[0])]
    return out


def test_split_over_cpu_and_two_workers_gives_the_local_logits(two_workers, gemma) -> None:
    a, b = two_workers
    prompt = [2, 17, 5, 33, 9, 41, 12, 7, 3, 28, 30, 11]
    with Driver(gemma, _params(n_gpu_layers=0)) as local:
        want = _generate(local, prompt, steps=6)
    # layers 2-5 on the workers, layers 0-1 and the head here
    with Driver(gemma, _params(rpc=(a.endpoint, b.endpoint), n_gpu_layers=4, tensor_split=(1, 1))) as split:
        devices = split.devices()
        got = _generate(split, prompt, steps=6)
    assert [d.name for d in devices] == [f"RPC {a.endpoint}", f"RPC {b.endpoint}", "CPU"]
    assert [len(d.layers) for d in devices] == [2, 2, 2]
    assert devices[2].layers == range(2) and devices[2].input and devices[2].output
    assert all(d.weight_bytes > 0 and d.kv_bytes > 0 for d in devices)
    for step, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"step {step}: max |diff| {np.abs(g - w).max()}"


@pytest.mark.slow
def test_the_starter_model_split_over_cpu_and_two_workers_gives_the_local_logits(two_workers, starter_gguf) -> None:
    a, b = two_workers  # Gemma 3 270M Q4_K_M: 18 layers, tied head; 6 here, 6 on each worker
    prompt = [2, 818, 5279, 529, 7001, 563]
    with Driver(starter_gguf, _params(n_gpu_layers=0)) as local:
        want = _generate(local, prompt, steps=3)
    with Driver(starter_gguf, _params(rpc=(a.endpoint, b.endpoint), n_gpu_layers=12, tensor_split=(1, 1))) as split:
        assert [len(d.layers) for d in split.devices()] == [6, 6, 6]
        got = _generate(split, prompt, steps=3)
    for step, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"step {step}: max |diff| {np.abs(g - w).max()}"


def test_head_on_a_worker_gets_its_own_copy_of_the_tied_embeddings(two_workers, gemma) -> None:
    a, b = two_workers
    prompt = [5, 6, 7, 8, 9]
    with Driver(gemma, _params(n_gpu_layers=0)) as local:
        want = _generate(local, prompt, steps=2)
    with Driver(gemma, _params(rpc=(a.endpoint, b.endpoint), n_gpu_layers=7, tensor_split=(1, 3))) as split:
        devices = split.devices()
        got = _generate(split, prompt, steps=2)
    # 7 "layers" (6 + the head) by shares 1:3: the first worker takes 2, the second 4 with the head
    assert [len(d.layers) for d in devices] == [2, 4, 0]
    assert devices[1].output and not devices[2].output and devices[2].input
    assert compute_reserved(devices)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma2", "olmo2", "qwen2moe", "gpt-oss"])
def test_every_family_gives_the_local_logits_on_a_worker(two_workers, tmp_path_factory, arch: str) -> None:
    # every layer on one worker, the head and the tensors of no layer (rope factors, ...) here
    path = tiny_gguf(tmp_path_factory, arch, "q8_0")
    n_layer = tiny_config(arch).n_layer
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    with Driver(path, _params(n_gpu_layers=0)) as local:
        want = _generate(local, prompt, steps=2)
    with Driver(path, _params(rpc=(two_workers[0].endpoint,), n_gpu_layers=n_layer)) as split:
        assert len(split.devices()[0].layers) == n_layer
        got = _generate(split, prompt, steps=2)
    for g, w in zip(got, want):
        assert np.array_equal(g, w), f"max |diff| {np.abs(g - w).max()}"


def compute_reserved(devices) -> bool:
    """Offloaded layers reserve the worst batch's compute buffers at load."""
    return all(d.compute_bytes > 0 for d in devices if len(d.layers) or d.output)


def test_pages_copy_read_and_write_on_workers(two_workers, gemma) -> None:
    a, b = two_workers
    prompt = list(range(3, 3 + 2 * PAGE))
    with Driver(gemma, _params(n_gpu_layers=0)) as local, \
            Driver(gemma, _params(rpc=(a.endpoint, b.endpoint), n_gpu_layers=6)) as split:
        for drv in (local, split):
            drv.forward(build_batch([Req(prompt, pages=[0, 1], kv_len=2 * PAGE)], PAGE))
            drv.copy_pages([0, 1], [5, 6])  # on the worker that holds each layer
        assert split.read_pages([0, 1, 5, 6]) == local.read_pages([0, 1, 5, 6])
        assert split.read_pages([5, 6]) == split.read_pages([0, 1])
        split.write_pages([9], local.read_pages([1]))
        assert split.read_pages([9]) == local.read_pages([1])


def test_plan_matches_the_loaded_placement(two_workers, gemma) -> None:
    a, b = two_workers
    params = _params(rpc=(a.endpoint, b.endpoint), n_gpu_layers=3)
    planned = plan_devices(gemma, params)
    with Driver(gemma, params) as drv:
        loaded = drv.devices()
    assert [(d.name, d.layers, d.output, d.weight_bytes, d.kv_bytes) for d in planned] == \
           [(d.name, d.layers, d.output, d.weight_bytes, d.kv_bytes) for d in loaded]
    assert all(d.compute_bytes == 0 for d in planned)


def test_auto_puts_every_layer_and_the_head_on_the_workers(two_workers, gemma) -> None:
    a, b = two_workers  # host memory is plenty for a tiny model: everything fits
    devices = plan_devices(gemma, _params(rpc=(a.endpoint, b.endpoint)))
    # 7 "layers" (6 + the head) split by free memory, equal on one machine: layer i goes to the
    # first worker while i / 7 < 1/2
    assert [len(d.layers) for d in devices] == [4, 2, 0]
    assert devices[1].output and devices[2].input


# --------------------------------------------------------------------------------------------
# Bad values
# --------------------------------------------------------------------------------------------


def test_bad_placements_are_refused_with_the_reason(two_workers, gemma) -> None:
    a, _ = two_workers
    cases = [
        (_params(n_gpu_layers=-2), "n_gpu_layers must be -1"),
        (_params(n_gpu_layers=3), "no GPU or RPC worker to offload to"),
        (_params(rpc=(a.endpoint,), n_gpu_layers=8), "more than this model has: 6 layers (7 with the output head"),
        (_params(rpc=(a.endpoint,), tensor_split=(1, 1)), "only 1 offload devices"),
        (_params(rpc=("no-port",)), "expected HOST:PORT"),
        (_params(rpc=(a.endpoint, a.endpoint)), "listed twice"),
    ]
    for params, message in cases:
        with pytest.raises(DriverError) as err:
            Driver(gemma, params)
        assert err.value.status == "invalid_argument" and message in err.value.message, err.value


def test_an_unreachable_worker_is_a_clear_load_error(gemma) -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(DriverError) as err:
        Driver(gemma, _params(rpc=(f"127.0.0.1:{port}",)))
    assert err.value.status == "backend"
    assert f"cannot connect to RPC worker 127.0.0.1:{port}" in err.value.message
    assert time.monotonic() - t0 < 30


def test_a_worker_of_another_protocol_version_is_refused(gemma) -> None:
    theirs = int(rpc.protocol_version().split(".")[0]) - 1
    with other_version_peer(theirs) as port, pytest.raises(DriverError) as err:
        Driver(gemma, _params(rpc=(f"127.0.0.1:{port}",)))
    assert err.value.status == "unsupported"
    assert f"speaks ggml RPC protocol {theirs}.0.0 but this ggml speaks {rpc.protocol_version()}" in err.value.message


# --------------------------------------------------------------------------------------------
# A worker that dies
# --------------------------------------------------------------------------------------------


def test_a_killed_worker_fails_the_calls_of_its_model_and_nothing_else(gemma) -> None:
    with workers(2) as (a, b):
        drv = Driver(gemma, _params(rpc=(a.endpoint, b.endpoint), n_gpu_layers=6, tensor_split=(1, 1)))
        first = drv.forward(build_batch([Req([1, 2, 3], pages=[0], kv_len=3)], PAGE))
        b.kill()
        t0 = time.monotonic()
        with pytest.raises(DriverError) as err:
            drv.forward(build_batch([Req([4], pages=[0], kv_len=4)], PAGE))
        assert time.monotonic() - t0 < 30
        assert err.value.status == "backend" and f"lost RPC worker {b.endpoint}" in err.value.message
        with pytest.raises(DriverError, match="lost RPC worker"):  # and every later call, at once
            drv.read_pages([0])
        drv.close()
        # a model on the surviving worker loads and runs in the same process
        with Driver(gemma, _params(rpc=(a.endpoint,), n_gpu_layers=6)) as again:
            res = again.forward(build_batch([Req([1, 2, 3], pages=[0], kv_len=3)], PAGE))
        assert np.array_equal(res.logits, first.logits)


async def _generate_forever(rt, args) -> None:
    """Decodes until it fails (end-of-generation tokens only end one generate call)."""
    ctx = rt.context()
    ctx.fill("a b c")
    while True:
        await ctx.generate(max_tokens=16)


async def test_a_worker_killed_mid_generation_fails_the_inferlet_with_its_address(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from pie_local.runtime.engine import Engine, EngineConfig

    long_gemma = tiny_gguf(tmp_path_factory, "gemma3", "q8_0", n_ctx=1 << 20)  # never ends by length
    with workers(2) as (a, b):
        params = DriverParams(n_threads=1, page_size=32, n_pages=1024, max_batch_tokens=64, rpc=(a.endpoint, b.endpoint),
                              n_gpu_layers=6, tensor_split=(1, 1))
        async with Engine(str(long_gemma), EngineConfig(driver=params)) as engine:
            handle = engine.launch(_generate_forever)
            await asyncio.sleep(1.0)  # decoding over both workers
            assert not handle.done()
            a.kill()
            with pytest.raises(Exception) as err:
                await asyncio.wait_for(handle.result(), timeout=60)
            assert f"lost RPC worker {a.endpoint}" in str(err.value)
