/*
 * phi3.c — Phi-3, Phi-3.5 and Phi-4-mini: Llama-shaped pre-norm blocks with a fused Q|K|V
 * projection (attn_qkv) and a fused gate|up projection (ffn_up, gate half first), NEOX RoPE
 * with LongRoPE frequency factors (the long or short set, chosen at load by the context a
 * sequence can reach, see loader.c) and LongRoPE's attention factor (rope.scaling.attn_factor).
 * Q is scaled by 1/sqrt(head_dim) before attention, as llama.cpp does (the f16 rounding of Q
 * then matches). The files' sliding window is ignored: llama.cpp disables it for Phi-3.
 */
#include "../internal.h"

void pie_build_phi3(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens] */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q, *k, *v; /* views of the fused projection: [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, cur, &q, &k, &v);
        q = pie_name(pie_rope(g, q, il), "Qcur", il);
        k = pie_name(pie_rope(g, k, il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        q = pie_name(ggml_scale(ctx, q, hp->attn_scale), "Qcur", il);
        cur = pie_name(pie_attention(g, il, q, k, v, 1.0f), "kqv_out", il); /* [n_head*head_dim_v, n] */
        cur = pie_name(pie_linear(g, L->wo, NULL, cur), "attn_out", il); /* [n_embd, n_tokens]; llama.cpp
                                                                             reads no output bias for Phi-3 */

        if (il == hp->n_layer - 1) { /* only the sampled rows go on */
            cur = pie_select_outputs(g, cur);
            x = pie_select_outputs(g, x);
        }
        x = ggml_add(ctx, cur, x); /* unnamed, as in llama.cpp */

        cur = pie_name(pie_norm(g, x, L->ffn_norm), "ffn_norm", il);
        cur = pie_name(pie_ffn_swiglu(g, L, cur), "ffn_out", il); /* [n_embd, n] */
        x = pie_name(ggml_add(ctx, x, cur), "l_out", il);
    }
    pie_graph_finish(g, x);
}
