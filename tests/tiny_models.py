"""Tiny random-weight GGUF models for tests, written with the `gguf` package.

``write_tiny_gguf(path, arch)`` writes a complete, loadable model of a few hundred kilobytes for
each architecture in ARCHES: full hyper-parameter metadata, a real vocabulary llama.cpp
accepts (SentencePiece "llama" with byte fallback by default, or a GPT-2 style byte-level BPE
with merges: ``vocab="bpe"``), and random weights scaled so activations
stay O(1) (logits then differ clearly between tokens, which makes comparisons meaningful).
The architectures differ where their graphs differ: qwen2 has QKV biases, qwen3 and gemma3 have
QK norms and a head_dim that is not n_embd / n_head, gemma3 has post-norms, tied embeddings,
and sliding-window layers (5 of every 6) with a small window so SWA matters in short tests.
phi3 fuses Q|K|V and gate|up and carries LongRoPE factors and attention factor; granite sets
its four multipliers; smollm3 has 4 layers, so the last one runs without RoPE; olmo2 has only
post-norms and Q/K norms over the whole projection; mistral3 uses YaRN (its own beta range and
log multiplier) over an original context of 16 and attention temperature, so both act within
a short test. gemma2 has post-norms, tied embeddings and every other layer sliding over a
window of 8, and caps its attention and final logits with caps small enough to change the
results of random weights. The mixtures of experts (qwen2moe, qwen3moe, olmoe, gpt-oss, and a Mixtral-style
llama: ``write_tiny_gguf(path, "llama", **MIXTRAL)``) have 4 experts of which each token uses 2,
routed by a router steep enough that tokens pick different experts; qwen2moe adds a shared
expert, olmoe Q/K norms over whole rows, gpt-oss biases, attention sinks, a sliding window on
every other layer, YaRN and MXFP4 experts. gemma3n has 25 layers so that llama.cpp's fixed KV
sharing applies (layers 20-24 write no KV: the sliding ones read layer 18's, the global one layer
19's), per-layer embeddings, AltUp over 4 streams, LAuReL and activation sparsity in the first 10
layers, with llama.cpp's fixed widths (per-layer inputs 256, LAuReL rank 64).

The ``write_*`` helpers at the end produce broken files for error-path tests.
"""

from __future__ import annotations

import ctypes
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

ARCHES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "granite", "smollm3", "olmo2", "mistral3",
          "qwen2moe", "qwen3moe", "olmoe", "gpt-oss", "gemma3n")

Q = gguf.GGMLQuantizationType
QUANTS = {
    "f32": Q.F32,
    "f16": Q.F16,
    "bf16": Q.BF16,
    "q8_0": Q.Q8_0,
    "q4_0": Q.Q4_0,
    "q4_1": Q.Q4_1,
    "q5_0": Q.Q5_0,
    "q5_1": Q.Q5_1,
    # quantized by ggml itself (the gguf package cannot): rows must hold whole 256-blocks
    "q2_k": Q.Q2_K,
    "q3_k": Q.Q3_K,
    "q4_k": Q.Q4_K,
    "q5_k": Q.Q5_K,
    "q6_k": Q.Q6_K,
    "iq4_nl": Q.IQ4_NL,
    "iq4_xs": Q.IQ4_XS,
    "mxfp4": Q.MXFP4,
}
_BY_GGML = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4}


@dataclass(frozen=True)
class TinyConfig:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_ff: int = 128
    n_ctx: int = 512
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    sliding_window: int = 0  # gemma2, gemma3, olmo2 (OLMo 3)
    attn_softcap: float = 0.0  # gemma2: attn_logit_softcapping; 0 = not written
    final_softcap: float = 0.0  # gemma2: final_logit_softcapping; 0 = not written
    tied: bool = False  # no output.weight: the embedding doubles as the LM head
    name: str = ""
    rope_scaling: str = ""  # rope.scaling.type ("none", "linear", "yarn", anything); "" = not written
    rope_factor: float = 0.0  # rope.scaling.factor; 0 = not written
    rope_orig_ctx: int = 0  # rope.scaling.original_context_length; 0 = not written
    rope_attn_factor: float = 0.0  # rope.scaling.attn_factor; 0 = not written
    longrope: bool = False  # rope_factors_long / rope_factors_short tensors
    fused_qkv: bool = False  # one attn_qkv matrix instead of attn_q, attn_k, attn_v
    ffn_bias: bool = False  # ffn_gate / ffn_up / ffn_down biases
    # granite's multipliers, mistral3's attention temperature and YaRN keys; 0 = not written
    logit_scale: float = 0.0
    residual_scale: float = 0.0
    embedding_scale: float = 0.0
    attention_scale: float = 0.0
    temperature_scale: float = 0.0
    yarn_log_mul: float = 0.0
    yarn_beta_fast: float = 0.0
    yarn_beta_slow: float = 0.0
    # mixture of experts (0 = a dense FFN); for llama, experts make a Mixtral-style file
    n_expert: int = 0  # expert_count
    n_expert_used: int = 0  # expert_used_count
    n_ff_exp: int = 0  # expert_feed_forward_length (0 = not written; experts are then n_ff wide)
    n_ff_shexp: int = 0  # qwen2moe's shared expert: expert_shared_feed_forward_length
    expert_quant: str = ""  # the experts' weight type (a key of QUANTS); "" = write_tiny_gguf's quant


# Each architecture's defaults; anything can be overridden through write_tiny_gguf(**overrides).
DEFAULTS: dict[str, TinyConfig] = {
    "llama": TinyConfig(name="tiny-llama"),
    "qwen2": TinyConfig(name="tiny-qwen2", rope_base=1_000_000.0, rms_eps=1e-6),
    "qwen3": TinyConfig(name="tiny-qwen3", head_dim=32, rope_base=1_000_000.0, rms_eps=1e-6),
    # 4 layers: with llama.cpp's gemma2 pattern, layers 0 and 2 use the window, 1 and 3 are global.
    "gemma2": TinyConfig(
        name="tiny-gemma2", n_layer=4, head_dim=32, rms_eps=1e-6, sliding_window=8, tied=True, attn_softcap=1.5,
        final_softcap=4.0,
    ),
    # 6 layers: with llama.cpp's gemma3 pattern, layers 0-4 use the window, layer 5 is global.
    "gemma3": TinyConfig(
        name="tiny-gemma3", n_layer=6, head_dim=32, rope_base=1_000_000.0, rms_eps=1e-6, sliding_window=8, tied=True
    ),
    # LongRoPE over an original context of 64: the tests' pools (and llama.cpp's n_ctx, at least
    # 256) are longer, so both take the long factors. Not named "...phi3...": llama.cpp
    # then edits Phi-3's special tokens (<|endoftext|>, ...), which the tiny vocabulary lacks.
    "phi3": TinyConfig(name="tiny-phi", rope_orig_ctx=64, rope_attn_factor=1.19, longrope=True, fused_qkv=True),
    "granite": TinyConfig(
        name="tiny-granite", logit_scale=2.0, residual_scale=0.5, embedding_scale=4.0, attention_scale=0.125
    ),
    "smollm3": TinyConfig(name="tiny-smollm3", n_layer=4, rope_base=5_000_000.0, rms_eps=1e-6, tied=True),
    "olmo2": TinyConfig(name="tiny-olmo2", rope_base=500_000.0, rms_eps=1e-6),
    "mistral3": TinyConfig(
        name="tiny-mistral3", rope_base=1_000_000.0, rope_scaling="yarn", rope_factor=4.0, rope_orig_ctx=16,
        # YaRN's correction range [0.3, 0.05] instead of [32, 1]: at head_dim 16 and an original
        # context of 16 both ends of it then move (dims 1..3 instead of 0..1)
        yarn_log_mul=1.0, yarn_beta_fast=0.3, yarn_beta_slow=0.05, temperature_scale=0.1,
    ),
    # 4 experts, 2 used per token; qwen2moe's Q and output are n_embd wide (llama.cpp's shapes)
    "qwen2moe": TinyConfig(
        name="tiny-qwen2moe", rope_base=1_000_000.0, rms_eps=1e-6, n_expert=4, n_expert_used=2, n_ff_exp=32,
        n_ff_shexp=96,
    ),
    "qwen3moe": TinyConfig(
        name="tiny-qwen3moe", head_dim=32, rope_base=1_000_000.0, rms_eps=1e-6, n_expert=4, n_expert_used=2,
        n_ff_exp=64,
    ),
    # llama.cpp's OLMoE: Q, K and V n_embd wide (no GQA), experts n_ff wide
    "olmoe": TinyConfig(name="tiny-olmoe", n_head_kv=4, n_ff=64, n_expert=4, n_expert_used=2),
    # gpt-oss: sliding window on every other layer, YaRN (factor 4 over 128 positions), biases,
    # attention sinks, MXFP4 experts (as OpenAI ships them)
    "gpt-oss": TinyConfig(
        name="tiny-gpt-oss", rope_base=150_000.0, sliding_window=8, rope_scaling="yarn", rope_factor=4.0,
        rope_orig_ctx=128, n_expert=4, n_expert_used=2, n_ff_exp=64, expert_quant="mxfp4",
    ),
    # gemma3n: llama.cpp's pattern of 5 (layers 4, 9, ... global) over a window of 8; tied, final
    # cap 30 (llama.cpp's fixed value)
    "gemma3n": TinyConfig(
        name="tiny-gemma3n", n_layer=25, head_dim=32, rope_base=1_000_000.0, rms_eps=1e-6, sliding_window=8, tied=True,
        final_softcap=30.0,
    ),
}

# gemma3n's widths and counts that llama.cpp fixes (its loader reads no key for them)
GEMMA3N_ALTUP, GEMMA3N_PER_LAYER, GEMMA3N_LAUREL_RANK, GEMMA3N_KV_LAYERS, GEMMA3N_SPARSE_LAYERS = 4, 256, 64, 20, 10
GEMMA3N_SPARSE_STD = 1.6448533535003662  # the normal distribution's 95% quantile, as the converter writes it

# Mixtral: a llama file with experts (write_tiny_gguf(path, "llama", **MIXTRAL)).
MIXTRAL = {"n_expert": 4, "n_expert_used": 2, "n_ff": 64}

# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
_WORDS = (
    "the of and to in is was for on that with as by at it from his he an be are this or had "
    "not but have were which one they you her she we all their there been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here"
).split()


@dataclass
class TinyVocab:
    """The tokenizer metadata of a tiny model (tests may edit it through write_tiny_gguf's vocab_hook)."""

    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None  # tokenizer.ggml.pre (BPE pre-tokenizer)
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    add_bos: bool = False


def spm_vocab() -> TinyVocab:
    """SentencePiece with byte fallback: <unk> <s> </s>, 256 byte tokens, letters, word prefixes (~700)."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [".", ",", "!", "?", "'"]
    # Every prefix of every word, so SentencePiece's pairwise merges can build whole words.
    for w in _WORDS:
        for end in range(2, len(w) + 1):
            piece = "\u2581" + w[:end]
            if piece not in pieces:
                pieces.append(piece)
    tokens += pieces
    types += [T.NORMAL] * len(pieces)
    # Longer pieces score higher so the SentencePiece merge prefers whole words.
    scores = [0.0] * (3 + 256) + [-100.0 + len(p) for p in pieces]
    return TinyVocab("llama", tokens, [int(t) for t in types], scores=scores, bos=BOS_ID, eos=EOS_ID, unk=UNK_ID,
                     add_bos=True)


def byte_chars() -> list[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the others
    (space, control bytes, ...) for the code points from U+0100 up, in byte order (space is 'Ġ')."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


BPE_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def bpe_vocab() -> TinyVocab:
    """Byte-level BPE: the 256 byte characters, every prefix of every word with its leading space
    ('Ġthe'), the merges that build those prefixes one character at a time, then three control
    tokens (<|endoftext|> is BOS and EOS, as in Qwen)."""
    T = gguf.TokenType
    space = byte_chars()[ord(" ")]
    tokens = byte_chars()
    merges: list[str] = []
    for w in _WORDS:
        prev = space
        for ch in w:
            piece = prev + ch
            if piece not in tokens:
                tokens.append(piece)
                merges.append(f"{prev} {ch}")
            prev = piece
    types = [int(T.NORMAL)] * len(tokens) + [int(T.CONTROL)] * len(BPE_CONTROL)
    end_of_text = len(tokens)
    return TinyVocab("gpt2", tokens + list(BPE_CONTROL), types, merges=merges, pre="qwen2", bos=end_of_text,
                     eos=end_of_text)


VOCABS: dict[str, Callable[[], TinyVocab]] = {"spm": spm_vocab, "bpe": bpe_vocab}


def _write_vocab(w: gguf.GGUFWriter, v: TinyVocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    for key, value in (("bos", v.bos), ("eos", v.eos), ("unknown", v.unk)):
        if value is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _initializers(rng: np.random.Generator):
    """Random float32 weights: a matrix [out, in] scaled by 1/sqrt(in), a norm near 1, a small bias."""

    def mat(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    return mat, norm, bias


def _tensors(arch: str, cfg: TinyConfig, n_vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 tensors in numpy order (ggml's ne reversed: a matrix [out, in] is ne = (in, out))."""

    mat, norm, bias = _initializers(rng)

    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    out: dict[str, np.ndarray] = {
        # std 1/sqrt(n_embd) keeps tied-embedding logits O(1) (gemma3 rescales its input by sqrt(n_embd))
        "token_embd.weight": mat(n_vocab, cfg.n_embd),
        "output_norm.weight": norm(cfg.n_embd),
    }
    if not cfg.tied:
        out["output.weight"] = mat(n_vocab, cfg.n_embd)
    if cfg.longrope:  # LongRoPE: long factors stretch the low frequencies, short ones barely
        half = cfg.head_dim // 2
        out["rope_factors_long.weight"] = np.linspace(1.0, 8.0, half).astype(np.float32)
        out["rope_factors_short.weight"] = (1.0 + 0.05 * rng.random(half)).astype(np.float32)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        if arch != "olmo2":  # OLMo 2 has post-norms only
            out[p + "attn_norm.weight"] = norm(cfg.n_embd)
        if cfg.fused_qkv:
            out[p + "attn_qkv.weight"] = mat(q_dim + 2 * kv_dim, cfg.n_embd)
        else:
            out[p + "attn_q.weight"] = mat(q_dim, cfg.n_embd)
            out[p + "attn_k.weight"] = mat(kv_dim, cfg.n_embd)
            out[p + "attn_v.weight"] = mat(kv_dim, cfg.n_embd)
        out[p + "attn_output.weight"] = mat(cfg.n_embd, q_dim)
        if arch in ("qwen2", "qwen2moe", "gpt-oss"):
            out[p + "attn_q.bias"] = bias(q_dim)
            out[p + "attn_k.bias"] = bias(kv_dim)
            out[p + "attn_v.bias"] = bias(kv_dim)
        if arch == "gpt-oss":
            out[p + "attn_output.bias"] = bias(cfg.n_embd)
            out[p + "attn_sinks.weight"] = (1.0 + rng.standard_normal(cfg.n_head)).astype(np.float32)
            out[p + "post_attention_norm.weight"] = norm(cfg.n_embd)  # gpt-oss's FFN norm
            out.update(_experts(arch, cfg, p, mat, bias))
            continue
        if arch in ("qwen3", "gemma3", "qwen3moe", "gemma3n"):
            out[p + "attn_q_norm.weight"] = norm(cfg.head_dim)
            out[p + "attn_k_norm.weight"] = norm(cfg.head_dim)
        if arch in ("olmo2", "olmoe"):  # over the whole projection, not per head
            out[p + "attn_q_norm.weight"] = norm(q_dim)
            out[p + "attn_k_norm.weight"] = norm(kv_dim)
        if arch in ("gemma2", "gemma3", "olmo2", "gemma3n"):
            out[p + "post_attention_norm.weight"] = norm(cfg.n_embd)
            out[p + "post_ffw_norm.weight"] = norm(cfg.n_embd)
        if arch != "olmo2":
            out[p + "ffn_norm.weight"] = norm(cfg.n_embd)
        if cfg.n_expert:
            out.update(_experts(arch, cfg, p, mat, bias))
            continue
        if arch == "phi3":  # gate and up in one matrix, gate first
            out[p + "ffn_up.weight"] = mat(2 * cfg.n_ff, cfg.n_embd)
        else:
            out[p + "ffn_gate.weight"] = mat(cfg.n_ff, cfg.n_embd)
            out[p + "ffn_up.weight"] = mat(cfg.n_ff, cfg.n_embd)
        out[p + "ffn_down.weight"] = mat(cfg.n_embd, cfg.n_ff)
        if cfg.ffn_bias:
            out[p + "ffn_gate.bias"] = bias(cfg.n_ff)
            out[p + "ffn_up.bias"] = bias(cfg.n_ff)
            out[p + "ffn_down.bias"] = bias(cfg.n_embd)
        if arch == "gemma3n":
            out.update(_gemma3n_layer(cfg, p, mat, norm, rng))
    if arch == "gemma3n":
        out.update(_gemma3n_model(cfg, n_vocab, mat, norm))
    return out


def _gemma3n_model(cfg: TinyConfig, n_vocab: int, mat: Callable, norm: Callable) -> dict[str, np.ndarray]:
    """gemma3n's per-layer embeddings (numpy [n_vocab, 256 * n_layer]) and their projection, and
    AltUp's projections into and out of its 3 extra streams (numpy [3, n_embd, n_embd])."""
    per_layer = GEMMA3N_PER_LAYER * cfg.n_layer
    extra = GEMMA3N_ALTUP - 1
    return {
        # std 1/sqrt(256): O(1) after llama.cpp's scaling by sqrt(256)
        "per_layer_token_embd.weight": mat(n_vocab, per_layer) * np.float32(np.sqrt(cfg.n_layer)),
        "per_layer_model_proj.weight": mat(per_layer, cfg.n_embd),
        "per_layer_proj_norm.weight": norm(GEMMA3N_PER_LAYER),
        "altup_proj.weight": np.stack([mat(cfg.n_embd, cfg.n_embd) for _ in range(extra)]),
        "altup_unembd_proj.weight": np.stack([mat(cfg.n_embd, cfg.n_embd) for _ in range(extra)]),
    }


def _gemma3n_layer(cfg: TinyConfig, p: str, mat: Callable, norm: Callable,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One gemma3n layer's per-layer input gate and projection, AltUp router and coefficients
    (small: each stream stays mostly itself), LAuReL's low-rank pair."""
    a, r = GEMMA3N_ALTUP, GEMMA3N_LAUREL_RANK

    def small(*shape: int) -> np.ndarray:
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    return {
        p + "inp_gate.weight": mat(GEMMA3N_PER_LAYER, cfg.n_embd),
        p + "proj.weight": mat(cfg.n_embd, GEMMA3N_PER_LAYER),
        p + "post_norm.weight": norm(cfg.n_embd),
        p + "altup_correct_coef.weight": small(a, a),
        p + "altup_correct_scale.weight": norm(cfg.n_embd),
        p + "altup_predict_coef.weight": small(a * a, a),
        p + "altup_router.weight": 4.0 * mat(a, cfg.n_embd),
        p + "altup_router_norm.weight": norm(cfg.n_embd),
        p + "laurel_l.weight": mat(r, cfg.n_embd),
        p + "laurel_r.weight": mat(cfg.n_embd, r),
        p + "laurel_post_norm.weight": norm(cfg.n_embd),
    }


def _gemma3n_metadata(w: gguf.GGUFWriter, cfg: TinyConfig) -> None:
    """The keys llama.cpp's converter writes for Gemma 3n (llama.cpp itself fixes most of them; the
    values agree with its fixed ones)."""
    w.add_altup_active_idx(0)
    w.add_altup_num_inputs(GEMMA3N_ALTUP)
    w.add_embedding_length_per_layer_input(GEMMA3N_PER_LAYER)
    w.add_shared_kv_layers(max(0, cfg.n_layer - GEMMA3N_KV_LAYERS))
    w.add_activation_sparsity_scale([GEMMA3N_SPARSE_STD if il < GEMMA3N_SPARSE_LAYERS else float("-inf")
                                     for il in range(cfg.n_layer)])
    w.add_sliding_window_pattern([il % 5 < 4 for il in range(cfg.n_layer)])


def _experts(arch: str, cfg: TinyConfig, p: str, mat: Callable, bias: Callable) -> dict[str, np.ndarray]:
    """One layer's router, experts (numpy [n_expert, out, in]), qwen2moe's shared expert and
    gpt-oss's biases (numpy [n_expert, out])."""
    ff = cfg.n_ff_exp or cfg.n_ff

    def experts(n_out: int, n_in: int) -> np.ndarray:
        return np.stack([mat(n_out, n_in) for _ in range(cfg.n_expert)])

    # a router 3x steeper than the weights: the experts' probabilities differ clearly per token
    out = {p + "ffn_gate_inp.weight": 3.0 * mat(cfg.n_expert, cfg.n_embd),
           p + "ffn_gate_exps.weight": experts(ff, cfg.n_embd),
           p + "ffn_up_exps.weight": experts(ff, cfg.n_embd),
           p + "ffn_down_exps.weight": experts(cfg.n_embd, ff)}  # fmt: skip
    if arch == "gpt-oss":
        out[p + "ffn_gate_inp.bias"] = bias(cfg.n_expert)
        out[p + "ffn_gate_exps.bias"] = np.stack([bias(ff) for _ in range(cfg.n_expert)])
        out[p + "ffn_up_exps.bias"] = np.stack([bias(ff) for _ in range(cfg.n_expert)])
        out[p + "ffn_down_exps.bias"] = np.stack([bias(cfg.n_embd) for _ in range(cfg.n_expert)])
    if arch == "qwen2moe":
        sh = cfg.n_ff_shexp or cfg.n_ff
        out[p + "ffn_gate_inp_shexp.weight"] = mat(1, cfg.n_embd)[0]
        out[p + "ffn_gate_shexp.weight"] = mat(sh, cfg.n_embd)
        out[p + "ffn_up_shexp.weight"] = mat(sh, cfg.n_embd)
        out[p + "ffn_down_shexp.weight"] = mat(cfg.n_embd, sh)
    return out


def _ggml_quantize(tensor: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """uint8 [rows, row bytes]: `tensor` quantized by ggml_quantize_chunk of the ggml that
    llama-cpp-python ships (the very code llama.cpp's quantize tool runs)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    src = np.ascontiguousarray(tensor, dtype=np.float32)
    n = src.shape[-1]
    rows = src.size // n  # a 3-D tensor (experts) is quantized as its rows
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((*src.shape[:-1], n // block * block_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def _encode(tensor: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """1-D tensors (norms, biases) stay f32, as llama.cpp's converters store them; a tensor a hook
    turned into another dtype (int32, float64, ...) is written in that type."""
    if tensor.dtype != np.float32:
        return tensor, None
    if tensor.ndim == 1 or qtype == Q.F32:
        return tensor, Q.F32
    if qtype == Q.F16:
        return tensor.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block:
        raise ValueError(f"row length {tensor.shape[-1]} is not a multiple of {qtype.name}'s block {block}")
    if qtype in _BY_GGML:
        return _ggml_quantize(tensor, qtype), qtype
    return gguf.quants.quantize(tensor, qtype), qtype


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _add_shape(w: gguf.GGUFWriter, cfg: TinyConfig | TinyEncoder) -> None:
    """The hyper-parameters every tiny model writes: context, widths, layers, heads."""
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)


def write_tiny_gguf(
    path: str | Path,
    arch: str,
    *,
    quant: str = "f32",
    vocab: str = "spm",
    seed: int = 0,
    arch_name: str | None = None,
    tensor_hook: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
    vocab_hook: Callable[[TinyVocab], None] | None = None,
    metadata_hook: Callable[[gguf.GGUFWriter], None] | None = None,
    **overrides: object,
) -> Path:
    """Writes a tiny random model of `arch` to `path` and returns the path.

    quant: a key of QUANTS (2-D weights only; norms and biases stay f32). The k-quants and iq4 types
    need every weight's rows to hold whole 256-element blocks (e.g. n_embd=256, n_ff=512).
    vocab: "spm" (SentencePiece with scores and byte tokens) or "bpe" (byte-level BPE with merges).
    overrides: fields of TinyConfig (n_embd, n_layer, head_dim, sliding_window, tied, ...).
    arch_name: write this as general.architecture instead of `arch` (for unknown-arch tests).
    tensor_hook: called as hook(name, float32 array) -> array to write (for broken-file tests); an
    array of another dtype is written in that type, None drops the tensor.
    vocab_hook: called with the TinyVocab before it is written, to edit it (broken vocabularies).
    metadata_hook: called with the writer after the standard keys, to add more.
    """
    if arch not in DEFAULTS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHES)}")
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; choose from {', '.join(QUANTS)}")
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; choose from {', '.join(VOCABS)}")
    cfg = replace(DEFAULTS[arch], **overrides)  # type: ignore[arg-type]
    path = Path(path)
    v = VOCABS[vocab]()
    n_vocab = len(v.tokens)  # the embedding's rows: a hook that edits tokens keeps the weights' shape
    if vocab_hook is not None:
        vocab_hook(v)
    rng = np.random.default_rng(seed)

    name = arch_name or arch
    w = gguf.GGUFWriter(str(path), name)
    w.add_name(cfg.name)
    _add_shape(w, cfg)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    if cfg.rope_scaling:
        w.add_string(gguf.Keys.Rope.SCALING_TYPE.format(arch=name), cfg.rope_scaling)
    if cfg.rope_factor:
        w.add_rope_scaling_factor(cfg.rope_factor)
    if cfg.rope_orig_ctx:
        w.add_rope_scaling_orig_ctx_len(cfg.rope_orig_ctx)
    optional_floats = (
        (gguf.Keys.Rope.SCALING_ATTN_FACTOR, cfg.rope_attn_factor),
        (gguf.Keys.Rope.SCALING_YARN_LOG_MUL, cfg.yarn_log_mul),
        (gguf.Keys.Rope.SCALING_YARN_BETA_FAST, cfg.yarn_beta_fast),
        (gguf.Keys.Rope.SCALING_YARN_BETA_SLOW, cfg.yarn_beta_slow),
        (gguf.Keys.LLM.LOGIT_SCALE, cfg.logit_scale),
        (gguf.Keys.LLM.RESIDUAL_SCALE, cfg.residual_scale),
        (gguf.Keys.LLM.EMBEDDING_SCALE, cfg.embedding_scale),
        (gguf.Keys.Attention.SCALE, cfg.attention_scale),
        (gguf.Keys.Attention.TEMPERATURE_SCALE, cfg.temperature_scale),
    )
    for key, value in optional_floats:
        if value:
            w.add_float32(key.format(arch=name), value)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(n_vocab)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.n_expert:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_used)
    if cfg.n_ff_exp:
        w.add_expert_feed_forward_length(cfg.n_ff_exp)
    if cfg.n_ff_shexp:
        w.add_expert_shared_feed_forward_length(cfg.n_ff_shexp)
    if cfg.attn_softcap:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)
    if arch == "gemma3n":
        _gemma3n_metadata(w, cfg)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32) if quant == "f32" else int(gguf.LlamaFileType.MOSTLY_F16))

    _write_vocab(w, v)
    if metadata_hook is not None:
        metadata_hook(w)

    for tname, tensor in _tensors(arch, cfg, n_vocab, rng).items():
        if tensor_hook is not None:
            tensor = tensor_hook(tname, tensor)
            if tensor is None:
                continue
        want = QUANTS[quant]
        if tname.endswith(".bias"):  # gpt-oss's 2-D expert biases stay f32 like the others
            want = Q.F32
        elif "_exps." in tname and cfg.expert_quant:
            want = QUANTS[cfg.expert_quant]
        elif tname.endswith("_coef.weight") and want not in (Q.F32, Q.F16):  # gemma3n's rows of 4: no whole block
            want = Q.F32
        data, qtype = _encode(tensor, want)
        w.add_tensor(tname, data, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_config(arch: str, **overrides: object) -> TinyConfig:
    """The hyper-parameters write_tiny_gguf(arch, **overrides) uses."""
    return replace(DEFAULTS[arch], **overrides)  # type: ignore[arg-type]


N_VOCAB = len(spm_vocab().tokens)
N_VOCAB_BPE = len(bpe_vocab().tokens)

# ---------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------


def write_truncated(src: str | Path, dst: str | Path, fraction: float = 0.6) -> Path:
    """A copy of `src` cut off at `fraction` of its size (header intact, tensor data short)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def write_wrong_magic(src: str | Path, dst: str | Path) -> Path:
    """A copy of `src` whose 4-byte magic reads 'GGML' instead of 'GGUF'."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.write(b"GGML")
    return Path(dst)


def write_unknown_arch(path: str | Path) -> Path:
    """A well-formed llama-shaped model whose general.architecture no driver knows."""
    return write_tiny_gguf(path, "llama", arch_name="pie-unknown-arch")


def write_shape_mismatch(path: str | Path, tensor: str = "blk.0.attn_q.weight") -> Path:
    """A llama model whose `tensor` has one output row too few for the metadata."""
    return write_tiny_gguf(path, "llama", tensor_hook=lambda name, t: t[:-1] if name == tensor else t)


# ---------------------------------------------------------------------------------------------
# Embedding models: bidirectional encoders without an LM head
# ---------------------------------------------------------------------------------------------

ENCODERS = ("bert", "nomic-bert", "gemma-embedding")
WPM_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WPM_SUFFIXES = ("s", "ing", "ed", "er", "ly")


def wpm_vocab() -> TinyVocab:
    """WordPiece as llama.cpp's BERT converter stores it (tokenizer.ggml.model "bert"): the special
    tokens, then word-initial pieces with a leading '\u2581' (every word, letter, digit and punctuation
    mark) and continuation pieces without it (letters, a few suffixes). [CLS] is BOS and [SEP] is
    appended, as llama.cpp's WPM tokenizer does."""
    T = gguf.TokenType
    words = [*_WORDS, *(chr(c) for c in range(ord("a"), ord("z") + 1)), *"0123456789", *".,!?'-()"]
    pieces = ["\u2581" + w for w in dict.fromkeys(words)]
    pieces += dict.fromkeys([*(chr(c) for c in range(ord("a"), ord("z") + 1)), *WPM_SUFFIXES])
    tokens = [*WPM_SPECIAL, *pieces]
    types = [int(T.CONTROL)] * len(WPM_SPECIAL) + [int(T.NORMAL)] * len(pieces)
    types[1] = int(T.UNKNOWN)
    return TinyVocab("bert", tokens, types, bos=2, unk=1, add_bos=True)


@dataclass
class TinyEncoder:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4  # gemma-embedding: 2 (grouped-query attention)
    head_dim: int = 16
    n_ff: int = 128
    n_ctx: int = 64  # bert: rows of the position table
    sliding_window: int = 0  # gemma-embedding: 6 (symmetric: 3 rows to each side)
    dense: int = 0  # gemma-embedding: width of the dense_2 / dense_3 projections; 0 = none


ENCODER_DEFAULTS = {
    "bert": TinyEncoder(),
    "nomic-bert": TinyEncoder(),
    "gemma-embedding": TinyEncoder(n_head_kv=2, sliding_window=6, dense=96),
}


def _encoder_tensors(arch: str, cfg: TinyEncoder, n_vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 tensors in numpy order; LayerNorms with weight and bias (bert, nomic-bert), or the
    gemma3 layout with RMS norms (gemma-embedding)."""

    mat, norm, bias = _initializers(rng)

    E, F, q_dim, kv_dim = cfg.n_embd, cfg.n_ff, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    out: dict[str, np.ndarray] = {"token_embd.weight": mat(n_vocab, E)}
    if arch == "gemma-embedding":
        out["output_norm.weight"] = norm(E)
        if cfg.dense:
            out["dense_2.weight"] = mat(cfg.dense, E)
            out["dense_3.weight"] = mat(E, cfg.dense)
    else:
        out["token_types.weight"] = (0.5 * rng.standard_normal((2, E))).astype(np.float32)
        if arch == "bert":
            out["position_embd.weight"] = (0.5 * rng.standard_normal((cfg.n_ctx, E))).astype(np.float32)
        out["token_embd_norm.weight"], out["token_embd_norm.bias"] = norm(E), bias(E)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        if arch == "nomic-bert":
            out[p + "attn_qkv.weight"] = mat(q_dim + 2 * kv_dim, E)
        else:
            out[p + "attn_q.weight"], out[p + "attn_k.weight"] = mat(q_dim, E), mat(kv_dim, E)
            out[p + "attn_v.weight"] = mat(kv_dim, E)
        out[p + "attn_output.weight"] = mat(E, q_dim)
        if arch == "gemma-embedding":
            out[p + "attn_norm.weight"] = norm(E)
            out[p + "attn_q_norm.weight"], out[p + "attn_k_norm.weight"] = norm(cfg.head_dim), norm(cfg.head_dim)
            out[p + "post_attention_norm.weight"], out[p + "ffn_norm.weight"] = norm(E), norm(E)
            out[p + "post_ffw_norm.weight"] = norm(E)
            out[p + "ffn_gate.weight"], out[p + "ffn_up.weight"] = mat(F, E), mat(F, E)
            out[p + "ffn_down.weight"] = mat(E, F)
            continue
        if arch == "bert":
            out[p + "attn_q.bias"], out[p + "attn_k.bias"] = bias(q_dim), bias(kv_dim)
            out[p + "attn_v.bias"] = bias(kv_dim)
            out[p + "attn_output.bias"] = bias(E)
        out[p + "attn_output_norm.weight"], out[p + "attn_output_norm.bias"] = norm(E), bias(E)
        if arch == "nomic-bert":
            out[p + "ffn_gate.weight"] = mat(F, E)
        out[p + "ffn_up.weight"], out[p + "ffn_down.weight"] = mat(F, E), mat(E, F)
        if arch == "bert":
            out[p + "ffn_up.bias"], out[p + "ffn_down.bias"] = bias(F), bias(E)
        out[p + "layer_output_norm.weight"], out[p + "layer_output_norm.bias"] = norm(E), bias(E)
    return out


def write_tiny_encoder(
    path: str | Path,
    arch: str,
    *,
    pooling: str = "mean",
    quant: str = "f32",
    seed: int = 0,
    causal: bool = False,
    tensor_hook: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
    **overrides: object,
) -> Path:
    """Writes a tiny random embedding model of `arch` (one of ENCODERS) to `path`, with the keys
    llama.cpp's converters write: attention.causal = false, pooling_type ("mean", "cls" or "last"),
    layer_norm_epsilon (bert, nomic-bert) or the sliding window (gemma-embedding); bert and
    nomic-bert get the WordPiece vocabulary, gemma-embedding the SentencePiece one. tensor_hook as
    in write_tiny_gguf (None drops a tensor); causal=True writes attention.causal = true (a file
    the driver refuses); overrides: fields of TinyEncoder."""
    if arch not in ENCODERS:
        raise ValueError(f"unknown tiny encoder {arch!r}; choose from {', '.join(ENCODERS)}")
    cfg = replace(ENCODER_DEFAULTS[arch], **overrides)  # type: ignore[arg-type]
    v = spm_vocab() if arch == "gemma-embedding" else wpm_vocab()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    _add_shape(w, cfg)
    w.add_causal_attention(causal)
    w.add_pooling_type({"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS,
                        "last": gguf.PoolingType.LAST}[pooling])
    if arch == "gemma-embedding":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_sliding_window(cfg.sliding_window)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 2)  # layer 0 slides, layer 1 is global
        if cfg.dense:
            for key, value in (("dense_2_feat_in", cfg.n_embd), ("dense_2_feat_out", cfg.dense),
                               ("dense_3_feat_in", cfg.dense), ("dense_3_feat_out", cfg.n_embd)):
                w.add_uint32(f"{arch}.{key}", value)
    else:
        w.add_layer_norm_eps(1e-12)
        if arch == "nomic-bert":
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_rope_freq_base(1000.0)
        w.add_token_type_count(2)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32) if quant == "f32" else int(gguf.LlamaFileType.MOSTLY_F16))
    _write_vocab(w, v)
    if v.model == "bert":
        w.add_sep_token_id(3)
        w.add_pad_token_id(0)
        w.add_mask_token_id(4)
    for tname, tensor in _encoder_tensors(arch, cfg, len(v.tokens), rng).items():
        if tensor_hook is not None:
            tensor = tensor_hook(tname, tensor)
            if tensor is None:
                continue
        keep_f32 = tname in ("token_types.weight", "position_embd.weight")  # as llama.cpp's converter keeps them
        data, qtype = _encode(tensor, Q.F32 if keep_f32 else QUANTS[quant])
        w.add_tensor(tname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
