/*
 * llama.c — the Llama family and its Qwen relatives (Llama 2/3, Mistral, SmolLM, TinyLlama,
 * Qwen2, Qwen3): pre-norm blocks with RMS norm, RoPE, grouped-query attention, SwiGLU FFN.
 * What differs between them comes from the table in arch.c: the RoPE mode (llama rotates
 * adjacent pairs, qwen halves), QKV biases (qwen2; used whenever the file has them) and a
 * per-head RMS norm on Q and K before RoPE (qwen3). Llama 3.1 rope frequency factors are used
 * when the file has them.
 */
#include "../internal.h"

void pie_build_llama(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;
    const int64_t nt = g->n_tokens;
    const bool qk_norm = hp->arch->needs & PIE_NEED_QK_NORM;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens] */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q = ggml_reshape_3d(ctx, pie_linear(g, L->wq, L->bq, cur), hp->head_dim, hp->n_head, nt);
        struct ggml_tensor *k = ggml_reshape_3d(ctx, pie_linear(g, L->wk, L->bk, cur), hp->head_dim, hp->n_head_kv, nt);
        struct ggml_tensor *v = ggml_reshape_3d(ctx, pie_linear(g, L->wv, L->bv, cur), hp->head_dim_v, hp->n_head_kv, nt);
        if (qk_norm) {
            q = pie_name(pie_norm(g, q, L->q_norm), "Qcur_normed", il);
            k = pie_name(pie_norm(g, k, L->k_norm), "Kcur_normed", il);
        }
        q = pie_name(pie_rope(g, q, il), "Qcur", il);
        k = pie_name(pie_rope(g, k, il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        cur = pie_name(pie_attention(g, il, q, k, v, hp->attn_scale), "kqv_out", il); /* [n_head*head_dim_v, n] */
        cur = pie_name(pie_linear(g, L->wo, L->bo, cur), "attn_out", il);          /* [n_embd, n_tokens] */

        if (il == hp->n_layer - 1) { /* only the sampled rows go on */
            cur = pie_select_outputs(g, cur);
            x = pie_select_outputs(g, x);
        }
        x = pie_name(ggml_add(ctx, x, cur), "ffn_inp", il);

        cur = pie_name(pie_norm(g, x, L->ffn_norm), "ffn_norm", il);
        cur = ggml_swiglu_split(ctx, pie_matmul(g, L->ffn_gate, cur), pie_matmul(g, L->ffn_up, cur)); /* [n_ff, n] */
        cur = pie_name(pie_matmul(g, L->ffn_down, cur), "ffn_out", il);
        x = pie_name(ggml_add(ctx, x, cur), "l_out", il);
    }
    pie_graph_finish(g, x);
}
