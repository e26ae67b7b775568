/*
 * gemma.c — Gemma 2 and Gemma 3: embeddings scaled by sqrt(n_embd); pre- and post-norms around
 * attention and FFN; GELU-gated FFN; NEOX RoPE; tied output head; Q scaled before attention.
 * Layers slide over a window of recent KV except the global ones (every n-th layer, or one flag
 * per layer). What differs comes from the hyper-parameter hooks below and the table in arch.c:
 *   gemma2: attention logits and final logits soft-capped (defaults 50 and 30), a window of 4096
 *           unless the file says otherwise, every 2nd layer global, sliding layers rotating with
 *           the global RoPE base and scaling unless the file gives them a base;
 *   gemma3: a per-head RMS norm on Q and K, sliding layers only when the file sets a window
 *           (every 6th layer global, their own RoPE base, default 10000, unscaled), an optional
 *           final logit softcap;
 *   gemma-embedding: gemma3's body, bidirectional and without a head (see its hook at the end).
 */
#include "../internal.h"

#include <math.h>
#include <stdint.h>

/* ------------------------------------------------------------------------------------------ */
/* Hyper-parameters                                                                           */
/* ------------------------------------------------------------------------------------------ */

int32_t pie_gemma2_hparams(pie_hparams *hp, const struct gguf_context *g) {
    hp->embd_scale = sqrtf((float)hp->n_embd);
    /* the 27B model scales by the embedding width per head, the others by head_dim */
    if (hp->n_layer == 46) hp->attn_scale = 1.0f / sqrtf((float)(hp->n_embd / hp->n_head));
    /* both caps divide: 0, negative or not finite is refused here, never a NaN later */
    hp->attn_softcap = 50.0f;
    hp->logit_softcap = 30.0f;
    hp->rope_base_swa = hp->rope_base;
    hp->rope_scale_swa = hp->rope_scale;
    int32_t st;
    if ((st = pie_gguf_positive(g, "gemma2.attn_logit_softcapping", false, &hp->attn_softcap)) ||
        (st = pie_gguf_positive(g, "gemma2.final_logit_softcapping", false, &hp->logit_softcap)))
        return st;

    /* Gemma 2 always slides: a window the file gives must be a count (llama.cpp would mask every
     * row with 0 and read a negative one as huge) */
    const char *key = "gemma2.attention.sliding_window";
    int64_t window = 4096;
    if (gguf_find_key(g, key) >= 0 && !pie_gguf_int(g, key, &window))
        return pie_set_error(PIE_ERR_FORMAT, "%s must be an integer", key);
    if (window <= 0 || window > INT32_MAX)
        return pie_set_error(PIE_ERR_FORMAT, "%s is %lld; it must be from 1 to %d", key, (long long)window, INT32_MAX);
    if ((st = pie_load_swa(hp, g, window, 2)) != PIE_OK) return st;
    return pie_gguf_positive(g, "gemma2.rope.freq_base_swa", false, &hp->rope_base_swa);
}

int32_t pie_gemma3_hparams(pie_hparams *hp, const struct gguf_context *g) {
    hp->embd_scale = sqrtf((float)hp->n_embd);
    if (hp->n_layer == 62) hp->attn_scale = 1.0f / sqrtf((float)(hp->n_embd / hp->n_head));
    int32_t st = pie_gguf_positive(g, "gemma3.final_logit_softcapping", true, &hp->logit_softcap);
    if (st != PIE_OK) return st;

    /* a window only when the file sets one; every 6th layer global by default */
    if ((st = pie_load_swa(hp, g, 0, 6)) != PIE_OK || hp->sliding_window == 0) return st;
    return pie_gguf_positive(g, "gemma3.rope.freq_base_swa", false, &hp->rope_base_swa);
}

/* ------------------------------------------------------------------------------------------ */
/* Graph                                                                                      */
/* ------------------------------------------------------------------------------------------ */

void pie_build_gemma(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;
    const bool qk_norm = hp->arch->needs & PIE_NEED_QK_NORM;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens], scaled by sqrt(n_embd) */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q, *k, *v; /* [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, cur, &q, &k, &v);
        if (qk_norm) {
            q = pie_name(pie_norm(g, q, L->q_norm), "Qcur_normed", il);
            k = pie_name(pie_norm(g, k, L->k_norm), "Kcur_normed", il);
        }
        q = pie_name(pie_rope(g, q, il), "Qcur", il);
        k = pie_name(pie_rope(g, k, il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        /* Q is scaled before attention (as Gemma's reference does), not inside it: the f16
         * rounding of Q then matches llama.cpp's; gemma2's attention softcap applies inside */
        cur = pie_attention(g, il, ggml_scale(ctx, q, hp->attn_scale), k, v, 1.0f);
        cur = pie_name(cur, "kqv_out", il);                                   /* [n_head*head_dim_v, n] */
        cur = pie_name(pie_linear(g, L->wo, NULL, cur), "attn_out", il);      /* [n_embd, n_tokens] */

        if (il == hp->n_layer - 1) {
            cur = pie_select_outputs(g, cur);
            x = pie_select_outputs(g, x);
        }
        cur = pie_name(pie_norm(g, cur, L->attn_post_norm), "attn_post_norm", il);
        x = pie_name(ggml_add(ctx, x, cur), "sa_out", il);

        cur = pie_name(pie_norm(g, x, L->ffn_norm), "ffn_norm", il);
        cur = pie_name(pie_geglu(g, L->ffn_gate, L->ffn_up, cur), "ffn_geglu", il); /* [n_ff, n] */
        cur = pie_name(pie_matmul(g, L->ffn_down, cur), "ffn_out", il);
        cur = pie_name(pie_norm(g, cur, L->ffn_post_norm), "ffn_post_norm", il);
        x = pie_name(ggml_add(ctx, x, cur), "l_out", il);
    }
    pie_graph_finish(g, x);
}

/* EmbeddingGemma (gemma-embedding): the Gemma 3 body, bidirectional (PIE_NON_CAUSAL), every
 * layer's Q scaled by 1/sqrt(head_dim); the file must give the window (symmetric: window / 2 to
 * each side, batch.c), every 6th layer global by default. */
int32_t pie_gemma_embedding_hparams(pie_hparams *hp, const struct gguf_context *g) {
    hp->embd_scale = sqrtf((float)hp->n_embd);
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    const char *key = "gemma-embedding.attention.sliding_window";
    if (gguf_find_key(g, key) < 0) return pie_set_error(PIE_ERR_FORMAT, "missing metadata key '%s'", key);
    int32_t st = pie_load_swa(hp, g, 0, 6);
    if (st != PIE_OK || hp->sliding_window == 0) return st;
    return pie_gguf_positive(g, "gemma-embedding.rope.freq_base_swa", false, &hp->rope_base_swa);
}
