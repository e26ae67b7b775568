"""Paged KV semantics: page layout, forks by page copy, BRLE masks, page snapshots.

Tiny models with 4-token pages make every sequence span many pages. Every comparison is exact:
a request's result depends neither on where its pages lie nor on its batch, attention skips the
KV rows a mask hides (so a hidden span equals an absent one), and the driver multiplies a lone
row of f16 weights with the kernel a many-row batch gets (so a decode step equals a prefill row).
"""

from __future__ import annotations

import numpy as np
import pytest
from driver_helpers import Req, SeqState, build_batch, tiny_gguf

from pie_local.driver import Driver, DriverError, DriverParams

pytestmark = pytest.mark.real_driver

PAGE = 4


def open_driver(tmp_path_factory, arch: str, kv_type: str = "f16", **overrides: object) -> Driver:
    params = DriverParams(n_threads=2, page_size=PAGE, n_pages=64, kv_type=kv_type)
    return Driver(tiny_gguf(tmp_path_factory, arch, **overrides), params)


@pytest.fixture(params=[("llama", "f16"), ("gemma3", "f16"), ("qwen3", "q8_0")], ids=["llama", "gemma3", "qwen3-q8kv"])
def driver(request, tmp_path_factory):
    """gemma3's sliding window is 8 here, so windows cross pages in these tests; qwen3 runs with
    a q8_0 KV pool, where page layout must not change results either."""
    arch, kv_type = request.param
    with open_driver(tmp_path_factory, arch, kv_type) as drv:
        yield drv


@pytest.fixture(params=["llama", "gemma3"])
def mask_driver(request, tmp_path_factory):
    """For "masked span == absent span": sliding windows count KV indices (pie_driver.h), so a
    hidden span would shift the window; gemma3 gets a window wider than these sequences."""
    with open_driver(tmp_path_factory, request.param, sliding_window=64) as drv:
        yield drv


def tokens_for(driver: Driver, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, driver.info.n_vocab, n - 1).tolist()


def run(driver: Driver, seq: SeqState, tokens: list[int], outputs="all") -> np.ndarray:
    res = driver.forward(build_batch([seq.req(tokens, outputs=outputs)], PAGE))
    seq.advance(tokens)
    return res.logits


def test_scattered_pages_equal_contiguous_pages(driver: Driver) -> None:
    toks = tokens_for(driver, 22)
    contiguous = SeqState(range(0, 8), PAGE)
    scattered = SeqState([41, 13, 60, 17, 9, 33, 25, 50], PAGE)  # disjoint from 0..7
    a = [run(driver, contiguous, toks)]
    b = [run(driver, scattered, toks)]
    for _ in range(6):  # decode across two page boundaries
        tok = int(np.argmax(a[-1][-1]))
        a.append(run(driver, contiguous, [tok]))
        b.append(run(driver, scattered, [tok]))
    np.testing.assert_array_equal(np.concatenate(b), np.concatenate(a))


def test_every_way_of_reading_kv_gives_the_same_result(driver: Driver) -> None:
    # One batch of four different 38-token sequences over 10 pages each, each read another way:
    # consecutive pages (a view of the pool), two runs of consecutive pages (copied into one
    # tensor from the first run's rows on), two runs whose first ends the pool (copied into one
    # tensor from the pool's start) and ten single pages (more runs than the driver copies
    # together: rows gathered). Then a decode step of all four. Each request gets exactly what it
    # gets alone on consecutive pages (a request's result depends neither on its pages nor its
    # batch).
    prompts = [tokens_for(driver, 38, seed=seed) for seed in (5, 6, 7, 8)]
    layouts = [range(0, 10), [*range(15, 20), *range(10, 15)], [*range(58, 64), *range(30, 34)],
               [41, 50, 39, 48, 37, 46, 35, 44, 53, 42]]
    batched = [SeqState(pages, PAGE) for pages in layouts]
    got = [np.split(driver.forward(build_batch([s.req(t, outputs="all") for s, t in zip(batched, prompts)], PAGE))
                    .logits, len(prompts))]
    steps = [[int(np.argmax(rows[-1]))] for rows in got[0]]  # each sequence feeds its own next token
    for seq, prompt in zip(batched, prompts):
        seq.advance(prompt)
    got.append(driver.forward(build_batch([s.req(t) for s, t in zip(batched, steps)], PAGE)).logits[:, None, :])
    for r, (prompt, step) in enumerate(zip(prompts, steps)):
        alone = SeqState(range(20, 30), PAGE)  # consecutive pages no batched sequence uses
        want_prefill = run(driver, alone, prompt)
        want_decode = run(driver, alone, step)
        np.testing.assert_array_equal(got[0][r], want_prefill, err_msg=f"request {r} prefill")
        np.testing.assert_array_equal(got[1][r], want_decode, err_msg=f"request {r} decode")


def test_forked_sequence_continues_like_the_original(driver: Driver) -> None:
    prompt = tokens_for(driver, 10, seed=1)  # 10 tokens: 2 full pages + a tail of 2
    orig = SeqState([0, 1, 2, 3, 4, 5], PAGE)
    run(driver, orig, prompt)

    # fork: share the two full pages, copy the partial tail page 2 -> 20
    driver.copy_pages([2], [20])
    fork = SeqState([0, 1, 20, 21, 22, 23], PAGE, kv_len=orig.kv_len, next_pos=orig.next_pos)

    cont = tokens_for(driver, 7, seed=2)[1:]  # 6 tokens: fills the tail and the next page
    got_orig = run(driver, orig, cont)
    got_fork = run(driver, fork, cont)
    np.testing.assert_array_equal(got_fork, got_orig)

    # the branches now diverge; the fork's writes must not leak into the original and vice versa
    fresh = SeqState(range(30, 40), PAGE)
    run(driver, fresh, prompt + cont)
    x, y = tokens_for(driver, 4, seed=3)[1:], tokens_for(driver, 4, seed=4)[1:]
    got_orig, got_fork = run(driver, orig, x), run(driver, fork, y)
    fresh_x = SeqState(range(30, 40), PAGE, kv_len=fresh.kv_len, next_pos=fresh.next_pos)
    np.testing.assert_array_equal(got_orig, run(driver, fresh_x, x))
    fresh_y = SeqState(range(30, 40), PAGE, kv_len=fresh.kv_len, next_pos=fresh.next_pos)
    np.testing.assert_array_equal(got_fork, run(driver, fresh_y, y))
    assert not np.allclose(got_orig, got_fork, atol=1e-3)  # different tokens, different logits


def test_brle_mask_hiding_a_span_equals_the_span_never_there(mask_driver: Driver) -> None:
    driver = mask_driver
    p = tokens_for(driver, 6, seed=5)  # visible prefix, positions 0..5
    s = tokens_for(driver, 5, seed=6)[1:] + [7]  # hidden span, positions 6..10
    q = tokens_for(driver, 7, seed=7)[1:]  # 6 tokens after it, positions 11..16
    n_p, n_s, n_q = len(p), len(s), len(q)
    kv_len = n_p + n_s + n_q

    # with the span: every token of q sees p and q (causally) but not s
    masks = [None] * (n_p + n_s) + [[0, n_p, n_s, kv_len - n_p - n_s] for _ in range(n_q)]
    with_span = Req(p + s + q, list(range(0, 5)), kv_len, masks=masks, outputs=list(range(n_p + n_s, kv_len)))
    got = driver.forward(build_batch([with_span], PAGE)).logits

    # without the span: p then q at the same positions (a gap of n_s in the positions)
    positions = list(range(n_p)) + list(range(n_p + n_s, kv_len))
    without = Req(p + q, list(range(10, 13)), n_p + n_q, positions=positions, outputs=list(range(n_p, n_p + n_q)))
    want = driver.forward(build_batch([without], PAGE)).logits
    np.testing.assert_array_equal(got, want)

    # and the mask mattered: without it the logits of q differ
    plain = Req(p + s + q, list(range(20, 25)), kv_len, outputs=list(range(n_p + n_s, kv_len)))
    assert np.max(np.abs(driver.forward(build_batch([plain], PAGE)).logits - want)) > 1e-2


def test_brle_mask_in_decode_step(mask_driver: Driver) -> None:
    """A single decode token with a custom mask (the driver's decode fast path must not skip it).
    Hiding the most recent span is exact: the KV before it never saw it (causality)."""
    driver = mask_driver
    toks = tokens_for(driver, 12, seed=8)
    seq = SeqState(range(0, 8), PAGE)
    run(driver, seq, toks)
    nxt = 5
    # new token at KV index 12 sees 0..7 and itself: runs masked 0, visible 8, masked 4, visible 1
    req = Req([nxt], list(range(0, 4)), 13, masks=[[0, 8, 4, 1]], outputs=[0])
    got = driver.forward(build_batch([req], PAGE)).logits
    positions = list(range(8)) + [12]
    want = driver.forward(
        build_batch([Req(toks[:8] + [nxt], list(range(20, 23)), 9, positions=positions, outputs=[8])], PAGE)
    ).logits
    np.testing.assert_array_equal(got, want)


def test_read_write_pages_round_trip(driver: Driver) -> None:
    info = driver.info
    toks = tokens_for(driver, 10, seed=9)
    pages = [4, 5, 6]
    seq = SeqState(pages, PAGE)
    run(driver, seq, toks)
    snapshot = driver.read_pages(pages)
    assert isinstance(snapshot, bytes) and len(snapshot) == len(pages) * info.page_bytes

    step = SeqState(pages, PAGE, kv_len=seq.kv_len, next_pos=seq.next_pos)
    before = run(driver, step, [11])

    # clobber the pages with another sequence, then restore the snapshot
    run(driver, SeqState(pages, PAGE), tokens_for(driver, 12, seed=10))
    assert driver.read_pages(pages) != snapshot
    driver.write_pages(pages, snapshot)
    assert driver.read_pages(pages) == snapshot
    again = SeqState(pages, PAGE, kv_len=seq.kv_len, next_pos=seq.next_pos)
    np.testing.assert_array_equal(run(driver, again, [11]), before)

    # the snapshot also works in other page slots
    driver.write_pages([40, 41, 42], snapshot)
    moved = SeqState([40, 41, 42], PAGE, kv_len=seq.kv_len, next_pos=seq.next_pos)
    np.testing.assert_array_equal(run(driver, moved, [11]), before)

    with pytest.raises(DriverError) as err:
        driver.write_pages(pages, snapshot[:-1])
    assert err.value.status == "invalid_argument"
