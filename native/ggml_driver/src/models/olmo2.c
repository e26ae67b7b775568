/*
 * olmo2.c — OLMo 2 (and OLMo 3, which adds sliding-window layers): no pre-norms; RMS norms after
 * attention and after the FFN, before each residual add; RMS norm of Q and K over the whole
 * projection (all heads at once) before RoPE; NEOX RoPE; SwiGLU FFN. With a sliding window
 * (OLMo 3), 3 of every 4 layers slide (pattern as the file says) and rotate with the global
 * base, unscaled, as llama.cpp does.
 */
#include "../internal.h"

int32_t pie_olmo2_hparams(pie_hparams *hp, const struct gguf_context *g) {
    int32_t st = pie_load_swa(hp, g, 0, 4);
    if (st != PIE_OK) return st;
    /* llama.cpp's graph rotates window layers with the global base, no scaling, no YaRN */
    hp->rope_base_swa = hp->rope_base;
    hp->rope_ext_factor_swa = 0.0f;
    hp->rope_attn_factor_swa = 1.0f;
    return PIE_OK;
}

void pie_build_olmo2(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;
    const int64_t nt = g->n_tokens;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens] */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *q, *k, *v; /* [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, x, &q, &k, &v);
        /* the norms span every head: [head_dim * n_head(_kv), n_tokens] */
        q = ggml_reshape_2d(ctx, ggml_is_contiguous(q) ? q : ggml_cont(ctx, q), hp->head_dim * hp->n_head, nt);
        k = ggml_reshape_2d(ctx, ggml_is_contiguous(k) ? k : ggml_cont(ctx, k), hp->head_dim * hp->n_head_kv, nt);
        q = pie_name(pie_norm(g, q, L->q_norm), "Qcur_normed", il);
        k = pie_name(pie_norm(g, k, L->k_norm), "Kcur_normed", il);
        q = ggml_reshape_3d(ctx, q, hp->head_dim, hp->n_head, nt);
        k = ggml_reshape_3d(ctx, k, hp->head_dim, hp->n_head_kv, nt);
        q = pie_name(pie_rope(g, q, il), "Qcur", il);
        k = pie_name(pie_rope(g, k, il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        struct ggml_tensor *cur = pie_name(pie_attention(g, il, q, k, v, hp->attn_scale), "kqv_out", il);
        cur = pie_name(pie_linear(g, L->wo, NULL, cur), "attn_out", il); /* [n_embd, n_tokens] */

        if (il == hp->n_layer - 1) { /* only the sampled rows go on */
            cur = pie_select_outputs(g, cur);
            x = pie_select_outputs(g, x);
        }
        cur = pie_name(pie_norm(g, cur, L->attn_post_norm), "attn_post_norm", il);
        x = pie_name(ggml_add(ctx, cur, x), "ffn_inp", il);

        cur = pie_name(pie_ffn_swiglu(g, L, x), "ffn_out", il); /* [n_embd, n] */
        /* llama.cpp names this one without its layer */
        cur = pie_name(pie_norm(g, cur, L->ffn_post_norm), "ffn_post_norm", -1);
        x = pie_name(ggml_add(ctx, cur, x), "l_out", il);
    }
    pie_graph_finish(g, x);
}
