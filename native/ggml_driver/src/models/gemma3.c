/*
 * gemma3.c — Gemma 3: embeddings scaled by sqrt(n_embd); pre- and post-norms around attention
 * and FFN; per-head RMS norm on Q and K; GELU-gated FFN; NEOX RoPE; tied output head.
 * Layers slide over a window of recent KV (own RoPE base, default 10000) except every
 * n-th layer (pattern, default 6), which attends globally. An optional final logit softcap.
 */
#include "../internal.h"

#include <math.h>
#include <stdint.h>

int32_t pie_gemma3_hparams(pie_hparams *hp, const struct gguf_context *g) {
    hp->embd_scale = sqrtf((float)hp->n_embd);
    /* the 27B model scales by the embedding width per head, the others by head_dim */
    if (hp->n_layer == 62) hp->attn_scale = 1.0f / sqrtf((float)(hp->n_embd / hp->n_head));
    int32_t st = pie_gguf_positive(g, "gemma3.final_logit_softcapping", true, &hp->logit_softcap);
    if (st != PIE_OK) return st;

    int64_t window = 0;
    if (!pie_gguf_int(g, "gemma3.attention.sliding_window", &window) || window <= 0) return PIE_OK;
    if (window > INT32_MAX) return pie_set_error(PIE_ERR_FORMAT, "gemma3.attention.sliding_window %lld is too large", (long long)window);
    hp->sliding_window = (int32_t)window;
    if ((st = pie_gguf_positive(g, "gemma3.rope.freq_base_swa", false, &hp->rope_base_swa)) != PIE_OK) return st;

    /* pattern: an array of per-layer flags, or n (every n-th layer global), default 6 */
    int64_t id = gguf_find_key(g, "gemma3.attention.sliding_window_pattern");
    if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY) {
        if (gguf_get_arr_type(g, id) != GGUF_TYPE_BOOL || (int64_t)gguf_get_arr_n(g, id) != hp->n_layer)
            return pie_set_error(PIE_ERR_FORMAT, "gemma3.attention.sliding_window_pattern must hold %d booleans", hp->n_layer);
        const bool *flags = gguf_get_arr_data(g, id);
        for (int il = 0; il < hp->n_layer; il++) hp->is_swa[il] = flags[il];
        return PIE_OK;
    }
    int64_t n = 6;
    pie_gguf_int(g, "gemma3.attention.sliding_window_pattern", &n);
    if (n < 0) return pie_set_error(PIE_ERR_FORMAT, "gemma3.attention.sliding_window_pattern is negative (%lld)", (long long)n);
    for (int il = 0; il < hp->n_layer; il++) hp->is_swa[il] = n == 0 || (il % n < n - 1);
    return PIE_OK;
}

void pie_build_gemma3(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;
    const int64_t nt = g->n_tokens;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens], scaled by sqrt(n_embd) */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q = ggml_reshape_3d(ctx, pie_linear(g, L->wq, NULL, cur), hp->head_dim, hp->n_head, nt);
        struct ggml_tensor *k = ggml_reshape_3d(ctx, pie_linear(g, L->wk, NULL, cur), hp->head_dim, hp->n_head_kv, nt);
        struct ggml_tensor *v = ggml_reshape_3d(ctx, pie_linear(g, L->wv, NULL, cur), hp->head_dim_v, hp->n_head_kv, nt);
        q = pie_name(pie_norm(g, q, L->q_norm), "Qcur_normed", il);
        k = pie_name(pie_norm(g, k, L->k_norm), "Kcur_normed", il);
        q = pie_name(pie_rope(g, q, il), "Qcur", il);
        k = pie_name(pie_rope(g, k, il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        /* Q is scaled before attention (as Gemma's reference does), not inside it: the f16
         * rounding of Q then matches llama.cpp's */
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
        cur = ggml_geglu_split(ctx, pie_matmul(g, L->ffn_gate, cur), pie_matmul(g, L->ffn_up, cur)); /* [n_ff, n] */
        cur = pie_name(pie_matmul(g, L->ffn_down, cur), "ffn_out", il);
        cur = pie_name(pie_norm(g, cur, L->ffn_post_norm), "ffn_post_norm", il);
        x = pie_name(ggml_add(ctx, x, cur), "l_out", il);
    }
    pie_graph_finish(g, x);
}
