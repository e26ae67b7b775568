/*
 * gemma3.c — Gemma 3: embeddings scaled by sqrt(n_embd); pre- and post-norms around attention
 * and FFN; per-head RMS norm on Q and K; GELU-gated FFN; NEOX RoPE; tied output head.
 * Layers slide over a window of recent KV (own RoPE base, default 10000) except every
 * n-th layer (pattern, default 6), which attends globally. An optional final logit softcap.
 */
#include "../internal.h"

#include <math.h>

int32_t pie_gemma3_hparams(pie_hparams *hp, const struct gguf_context *g) {
    hp->embd_scale = sqrtf((float)hp->n_embd);
    /* the 27B model scales by the embedding width per head, the others by head_dim */
    if (hp->n_layer == 62) hp->attn_scale = 1.0f / sqrtf((float)(hp->n_embd / hp->n_head));
    int32_t st = pie_gguf_positive(g, "gemma3.final_logit_softcapping", true, &hp->logit_softcap);
    if (st != PIE_OK) return st;

    /* every 6th layer global by default */
    if ((st = pie_load_swa(hp, g, 6)) != PIE_OK || hp->sliding_window == 0) return st;
    return pie_gguf_positive(g, "gemma3.rope.freq_base_swa", false, &hp->rope_base_swa);
}

void pie_build_gemma3(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens], scaled by sqrt(n_embd) */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q, *k, *v; /* [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, cur, &q, &k, &v);
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
