"""The driver's logits against llama.cpp's (llama-cpp-python, low-level API) on the same GGUF.

Both run the same ggml CPU kernels on the same weights with an f16 KV cache. ggml picks a matrix
product's kernel by its column count: llama.cpp by the size of its whole batch, the driver by the
size of each request (pie_matmul: narrow requests of fewer than 16 rows take vec_dot, wider ones
the many-column kernels). So a sequence llama.cpp computes alone gets the very same kernels here
whenever it brings fewer than 8 or at least 16 rows to a pass, and its logits match bit for bit,
in a batch or not: those comparisons have tolerance 0, and a request's error in a mixed batch is
reported for that request. Only a prompt split into other chunks than llama.cpp's (8..15-token
chunks, or sums in another order) differs by rounding, which Gemma 3 amplifies; those tests keep
measured tolerances, each with its reason. The driver loads plain weights here (repack off), as
the reference does; repacked weights against llama.cpp's: test_driver_repack.py.

Each comparison records max/mean |diff|, the largest per-row KL(ref || driver) and top-1
agreement (``pytest -rA`` prints them, ``--junitxml`` stores them as properties).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from driver_helpers import Req, SeqState, build_batch, log_softmax, tiny_gguf
from llama_ref import LlamaRef

from pie_local.driver import Driver, DriverParams

pytestmark = [pytest.mark.real_driver, pytest.mark.llama_cpp]


@dataclass(frozen=True)
class Tolerance:
    max_abs: float  # largest |logit diff| anywhere
    mean_abs: float  # mean |logit diff| over every row and vocabulary entry
    max_kl: float  # largest per-row KL(ref || driver) in nats
    tie_gap: float  # rows whose reference top-2 logits differ by more must agree on the argmax


# The same kernels on the same inputs in the same order: nothing may differ.
EXACT = Tolerance(max_abs=0.0, mean_abs=0.0, max_kl=0.0, tie_gap=0.0)
# Starter model (Gemma 3 270M Q4_K_M, logits in ~[-27, 30]), a prompt prefilled in other chunks
# than llama.cpp's one pass: a 13-token chunk takes vec_dot where llama.cpp's 51-token pass takes
# the tiled k-quant kernel, and the KV the later rows read differs by that rounding. Measured:
# max 1.18, mean 0.17, KL 0.028, top-1 0.93 (swaps only on near-ties). This model is touchy:
# llama.cpp's own flash-attention switch moves PROMPTS by max 2.08, mean 0.29, KL 0.074. A wrong
# RoPE base or a missing norm gives mean |diff| > 1 and KL > 1.
CHUNKED_TOL = Tolerance(max_abs=3.0, mean_abs=0.4, max_kl=0.25, tie_gap=1.5)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends "
    "of worms and an oozy smell, nor yet a dry, bare, sandy hole with nothing in it to sit down on",
]


def compare(record_property, label: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> None:
    """Asserts every measure of closeness in `tol` and records them."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.all(np.isfinite(got)), f"{label}: non-finite logits"
    diff = np.abs(got.astype(np.float64) - ref)
    lp_ref, lp_got = log_softmax(ref), log_softmax(got)
    kl = float(np.max(np.sum(np.exp(lp_ref) * (lp_ref - lp_got), axis=-1)))
    top_got, top_ref = got.argmax(axis=-1), ref.argmax(axis=-1)
    m = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "max_kl": kl,
         "top1_agreement": float(np.mean(top_got == top_ref))}  # fmt: skip
    for key, value in m.items():
        record_property(f"{label}.{key}", value)
    print(f"{label}: " + " ".join(f"{k}={v:.5f}" for k, v in m.items()) + f" rows={got.shape[0]}")
    assert m["max_abs_diff"] <= tol.max_abs, f"{label}: {m}"
    assert m["mean_abs_diff"] <= tol.mean_abs, f"{label}: {m}"
    assert kl <= tol.max_kl, f"{label}: {m}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > tol.tie_gap
    assert np.array_equal(top_got[clear], top_ref[clear]), f"{label}: argmax differs on a clear row"


# ---------------------------------------------------------------------------------------------
# Starter model
# ---------------------------------------------------------------------------------------------

PAGE = 16


@pytest.fixture(scope="module")
def starter(starter_gguf):
    params = DriverParams(n_threads=2, page_size=PAGE, n_pages=96, max_batch_tokens=512, repack=False, own_kernels=False)
    with Driver(starter_gguf, params) as driver:
        yield driver


@pytest.fixture(scope="module")
def ref(starter_gguf):
    with LlamaRef(starter_gguf, n_ctx=2048, n_threads=2) as r:
        yield r


def run_rows(driver: Driver, seq: SeqState, tokens: list[int], rows: list[int]) -> np.ndarray:
    """Appends tokens to seq in one forward call; logits of the given new-token indices."""
    req = seq.req(tokens, outputs=rows)
    res = driver.forward(build_batch([req], driver.info.page_size))
    seq.advance(tokens)
    return res.logits


def test_model_info_matches_llama_cpp(starter: Driver, ref: LlamaRef) -> None:
    info = starter.info
    assert (info.arch, info.n_vocab, info.n_embd) == ("gemma3", ref.n_vocab, ref.n_embd)
    assert (info.n_layer, info.head_dim, info.sliding_window) == (18, 256, 512)
    assert info.page_size == PAGE and info.n_pages == 96


@pytest.mark.parametrize(
    "prompt_index", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_prompt_logits_match(starter: Driver, ref: LlamaRef, record_property, prompt_index: int) -> None:
    """One sequence in one pass, every row sampled (6, 22 and 51 tokens): exact, see the module."""
    tokens = ref.tokenize(PROMPTS[prompt_index])
    ref.reset()
    want = ref.logits(tokens, rows="all")
    seq = SeqState(range(10), PAGE)
    got = run_rows(starter, seq, tokens, list(range(len(tokens))))
    compare(record_property, f"starter.prompt{prompt_index}", got, want, EXACT)


@pytest.mark.slow
def test_mixed_batch_matches_single_sequences(starter: Driver, ref: LlamaRef, record_property) -> None:
    """Three prompts of 4, ~22 and ~51 tokens in one batch: each exactly what llama.cpp gives it alone."""
    seqs = [ref.tokenize(p) for p in PROMPTS]
    seqs[0] = seqs[0][:4]  # lengths differ a lot: 4, ~20, ~50 tokens
    pools = [range(0, 10), range(10, 20), range(20, 30)]
    states = [SeqState(pool, PAGE) for pool in pools]
    reqs = [st.req(toks, outputs="all") for st, toks in zip(states, seqs, strict=True)]
    got = np.split(starter.forward(build_batch(reqs, PAGE)).logits, np.cumsum([len(t) for t in seqs])[:-1])
    for r, toks in enumerate(seqs):
        ref.reset()
        compare(record_property, f"starter.mixed_batch.request{r}", got[r], ref.logits(toks, rows="all"), EXACT)


def test_scheduler_batch_matches_llama_cpp(starter: Driver, ref: LlamaRef, record_property) -> None:
    """The batch the scheduler builds: decode rows over cached KV (one of them at positions offset
    by 300 from its KV indices) next to a prefill chunk that continues a prompt, every row of it
    sampled. Each request is compared with llama.cpp computing that sequence alone, with the same
    history in the same pieces: exact. (Pieces of fewer than 8 or at least 16 tokens, so both
    engines pick the same kernels; see the module.)"""
    text = ref.tokenize(PROMPTS[2])
    # name: (history, new tokens, first position); every piece < 8 or >= 16 tokens
    plan = {
        "decode": (text[:5], text[5:6], 0),
        "decode_long": (text[:20], text[20:21], 0),
        "chunk": (text[:7], text[7:27], 0),
        "decode_offset": (text[30:34], text[34:35], 300),
    }
    states = {name: SeqState(range(10 * i, 10 * i + 10), PAGE) for i, name in enumerate(plan)}
    for name, (history, _, start) in plan.items():  # the histories, each in its own earlier pass
        seq = states[name]
        positions = list(range(start, start + len(history)))
        starter.forward(build_batch([seq.req(history, outputs=[], positions=positions)], PAGE))
        seq.advance(history, positions)
    reqs = [states[name].req(new, outputs="all") for name, (_, new, _) in plan.items()]
    got = np.split(starter.forward(build_batch(reqs, PAGE)).logits, np.cumsum([len(r.tokens) for r in reqs])[:-1])
    for (name, (history, new, start)), rows in zip(plan.items(), got, strict=True):
        ref.reset()
        ref.logits(history, start_pos=start, rows=[])
        want = ref.logits(new, start_pos=start + len(history), rows="all")
        compare(record_property, f"starter.scheduler_batch.{name}", rows, want, EXACT)


@pytest.mark.slow
def test_chunked_prefill_then_decode(starter: Driver, ref: LlamaRef, record_property) -> None:
    prompt = ref.tokenize(PROMPTS[2])
    chunks = [prompt[:13], prompt[13:35], prompt[35:]]  # boundaries inside pages, not on them
    seq = SeqState(list(range(40, 60))[::-1], PAGE)  # pages in descending order, for good measure
    got = [run_rows(starter, seq, c, list(range(len(c)))) for c in chunks]
    ref.reset()
    want = [ref.logits(prompt, rows="all")]
    # decode: both sides feed the driver's greedy choice, then compare each step's logits
    last = got[-1][-1]
    for _ in range(6):
        token = int(np.argmax(last))
        got.append(run_rows(starter, seq, [token], [0]))
        want.append(ref.decode([token], [seq.kv_len - 1], [0], [0]))
        last = got[-1][-1]
    compare(record_property, "starter.chunked_prefill_decode", np.concatenate(got), np.concatenate(want), CHUNKED_TOL)


@pytest.mark.slow
def test_long_prompt_crosses_sliding_window(starter: Driver, ref: LlamaRef, record_property) -> None:
    """700 tokens > the 512-token window of gemma3's local layers, prefilled in 3 calls."""
    text = " ".join(PROMPTS[2] for _ in range(16))
    prompt = ref.tokenize(text)[:700]
    assert len(prompt) == 700
    rows = [0, 255, 511, 512, 600, 699]
    seq = SeqState(range(50), PAGE)
    got = []
    for lo, hi in [(0, 256), (256, 512), (512, 700)]:
        got.append(run_rows(starter, seq, prompt[lo:hi], [r - lo for r in rows if lo <= r < hi]))
    ref.reset()
    want = ref.logits(prompt, rows=rows)
    tok = int(np.argmax(got[-1][-1]))
    got.append(run_rows(starter, seq, [tok], [0]))
    want = np.concatenate([want, ref.decode([tok], [700], [0], [0])])
    compare(record_property, "starter.long_prompt_swa", np.concatenate(got), want, CHUNKED_TOL)


@pytest.mark.slow
def test_greedy_generation_agrees_with_llama_cpp(starter: Driver, ref: LlamaRef) -> None:
    """16 greedy tokens from the driver's sampler; at every step llama.cpp, fed the same tokens,
    ranks the driver's choice first (or within the tie gap of its first)."""
    prompt = ref.tokenize(PROMPTS[0])
    seq = SeqState(range(60, 70), PAGE)
    feed, out = prompt, []
    for _ in range(16):
        out.append(int(starter.forward(build_batch([seq.req(feed)], PAGE)).tokens[0]))
        seq.advance(feed)
        feed = [out[-1]]
    ref.reset()
    rows = ref.logits(prompt + out[:-1], rows=range(len(prompt) - 1, len(prompt) + len(out) - 1))
    for step, (token, row) in enumerate(zip(out, rows, strict=True)):
        assert row[token] >= row.max() - CHUNKED_TOL.tie_gap, f"step {step}: {token} vs llama.cpp {row.argmax()}"
    assert len(ref.detokenize(out).strip()) > 10  # real text came out


# ---------------------------------------------------------------------------------------------
# Tiny random models, one per architecture (and quantized variants)
# ---------------------------------------------------------------------------------------------

TINY_CASES = [
    ("llama", "f32"),
    ("qwen2", "f32"),
    ("qwen3", "f32"),
    ("gemma2", "f32"),
    ("gemma3", "f32"),
    ("llama", "q4_0"),
    ("qwen2", "f16"),
    ("gemma2", "q8_0"),
    ("gemma3", "q8_0"),
    ("phi3", "f32"),
    ("granite", "f32"),
    ("smollm3", "f32"),
    ("olmo2", "f32"),
    ("mistral3", "f32"),
    ("phi3", "q8_0"),
    ("olmo2", "f16"),
    # mixtures of experts (more in test_driver_moe.py): expert products take vec_dot at any
    # row count for these types, on both sides
    ("qwen2moe", "f32"),
    ("qwen3moe", "f32"),
    ("olmoe", "f32"),
    ("qwen3moe", "q8_0"),
    ("gpt-oss", "f32"),  # MXFP4 experts
    # per-layer embeddings, AltUp, LAuReL, KV sharing (more in test_driver_gemma3n.py)
    ("gemma3n", "f32"),
    ("gemma3n", "f16"),
    ("gemma3n", "q8_0"),
]


@pytest.mark.parametrize(("arch", "quant"), TINY_CASES, ids=[f"{a}-{q}" for a, q in TINY_CASES])
def test_tiny_model_logits_match(tmp_path_factory, record_property, arch: str, quant: str) -> None:
    """Request A in three passes (a 13-token chunk batched with request B, 17 more, 5 decode steps)
    against llama.cpp's one pass over the same 35 tokens; B against llama.cpp alone. Tolerance 0,
    although the chunking differs: f32 and f16 products take llama.cpp's many-column kernel on
    both sides (the driver pairs a lone column with a zero one), q4_0 and q8_0 products sum the
    same way at any column count (on x86), and attention sums every row on its own."""
    path = tiny_gguf(tmp_path_factory, arch, quant)
    page = 8
    rng = np.random.default_rng(zlib.crc32(f"{arch}-{quant}".encode()))
    with (
        LlamaRef(path, n_ctx=256, n_seq_max=2) as ref,
        Driver(path, DriverParams(n_threads=2, page_size=page, n_pages=32, repack=False, own_kernels=False)) as drv,
    ):
        n_vocab = drv.info.n_vocab
        assert n_vocab == ref.n_vocab and drv.info.arch == arch
        if arch in ("gemma2", "gemma3", "gpt-oss"):
            assert drv.info.sliding_window == 8
        a = [1] + rng.integers(3, n_vocab, 29).tolist()  # 30 tokens: well past the window of 8
        b = [1] + rng.integers(3, n_vocab, 11).tolist()

        # one batch with two requests, then A continues over two more calls and decodes
        sa, sb = SeqState(range(0, 16), page), SeqState(range(31, 15, -1), page)
        first = drv.forward(build_batch([sa.req(a[:13], outputs="all"), sb.req(b, outputs="all")], page)).logits
        sa.advance(a[:13])
        sb.advance(b)
        got = [first[:13]]
        got.append(drv.forward(build_batch([sa.req(a[13:], outputs="all")], page)).logits)
        sa.advance(a[13:])
        decoded = []
        for _ in range(5):
            tok = int(np.argmax(got[-1][-1]))
            decoded.append(tok)
            got.append(drv.forward(build_batch([sa.req([tok], outputs="all")], page)).logits)
            sa.advance([tok])

        ref.reset()
        want = [ref.logits(a + decoded, seq_id=0, rows="all")]
        compare(record_property, f"tiny.{arch}.{quant}.seqA", np.concatenate(got), want[0], EXACT)
        want_b = ref.logits(b, seq_id=1, rows="all")
        compare(record_property, f"tiny.{arch}.{quant}.seqB", first[13:], want_b, EXACT)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "gemma3n"])  # q8_0 KV needs head_dim % 32 == 0
def test_tiny_q8_kv_and_hidden_states_match(tmp_path_factory, record_property, arch: str) -> None:
    """One 26-token request, its final hidden states and its logits with an f16 and a q8_0 KV
    pool: exact (ggml's kernels on the same values, own_kernels off; the KV quantized by the same
    code)."""
    path = tiny_gguf(tmp_path_factory, arch)
    page = 8
    tokens = [1] + np.random.default_rng(3).integers(3, 500, 25).tolist()
    rows = list(range(len(tokens)))
    with LlamaRef(path, n_ctx=256, embeddings=True) as ref:
        ref_logits = ref.logits(tokens)
        ref_hidden = ref.hidden(rows)
    with Driver(path, DriverParams(n_threads=2, page_size=page, n_pages=8, own_kernels=False)) as drv:
        res = drv.forward(build_batch([SeqState(range(8), page).req(tokens, outputs="all")], page, return_hidden=True))
    assert res.hidden.shape == ref_hidden.shape
    hidden_diff = float(np.abs(res.hidden - ref_hidden).max())
    record_property(f"tiny.{arch}.hidden.max_abs_diff", hidden_diff)
    assert hidden_diff == 0.0
    compare(record_property, f"tiny.{arch}.f16kv", res.logits, ref_logits, EXACT)

    with LlamaRef(path, n_ctx=256, kv_type="q8_0", flash_attn=True) as ref:
        ref_q8 = ref.logits(tokens)
    with Driver(path, DriverParams(n_threads=2, page_size=page, n_pages=8, kv_type="q8_0", own_kernels=False)) as drv:
        assert drv.info.kv_type == "q8_0"
        got = drv.forward(build_batch([SeqState(range(8), page).req(tokens, outputs="all")], page)).logits
    compare(record_property, f"tiny.{arch}.q8kv", got, ref_q8, EXACT)


# ---------------------------------------------------------------------------------------------
# RoPE scaling
# ---------------------------------------------------------------------------------------------


def test_rope_scaling_matches_llama_cpp(tmp_path_factory, record_property) -> None:
    """Files asking for RoPE scaling (factor 4 over an original context of 128) get what llama.cpp
    gives them, at positions past the original context. Tolerance 0: one request on the same
    kernels (see test_driver_activations.py), YaRN's factors computed as llama.cpp computes them."""
    tokens = [1] + np.random.default_rng(11).integers(3, 500, 39).tolist()
    positions = list(range(200, 200 + len(tokens)))
    got = {}
    for scaling in ("none", "linear", "yarn"):
        path = tiny_gguf(tmp_path_factory, "qwen2", rope_scaling=scaling, rope_factor=4.0, rope_orig_ctx=128)
        with LlamaRef(path, n_ctx=512) as ref:
            want = ref.logits(tokens, start_pos=positions[0])
        with Driver(path, DriverParams(n_threads=2, page_size=8, n_pages=8, own_kernels=False)) as drv:
            req = Req(tokens, list(range(5)), len(tokens), positions=positions, outputs=list(range(len(tokens))))
            got[scaling] = drv.forward(build_batch([req], 8)).logits
        compare(record_property, f"tiny.rope_{scaling}", got[scaling], want, EXACT)
    # and the three really differ (YaRN is not run as linear scaling, nor linear as none)
    assert not np.allclose(got["yarn"], got["linear"], atol=1e-3)
    assert not np.allclose(got["linear"], got["none"], atol=1e-3)
