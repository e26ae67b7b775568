/*
 * moe.c — the feed-forward block every family shares: a dense SwiGLU FFN, or a mixture of
 * experts when the layer has a router (Mixtral-style llama, qwen2moe, qwen3moe, olmoe), computed
 * as llama.cpp's build_moe_ffn computes it:
 *   probs    = softmax(router x)                      per token over n_expert
 *   selected = the n_expert_used largest probs         (argsort, descending)
 *   weights  = their probs, renormalised to sum 1 where the family does (PIE_MOE_NORM_WEIGHTS)
 *   out      = sum over the selected e of weights[e] * down_e(silu(gate_e x) * up_e x)
 * plus, for qwen2moe, a shared expert scaled by sigmoid(gate_inp_shexp . x); gpt-oss's variant
 * adds biases, routes by logit and weighs by a softmax over the chosen experts.
 * (expert_weights_scale is not read: llama.cpp's loaders for these families do not read it.)
 * Also the OLMoE builder (llama's block with RMS norms over whole Q and K rows) and gpt-oss's.
 */
#include "../internal.h"

#include <math.h>
#include <stdio.h>

/* ------------------------------------------------------------------------------------------ */
/* Hyper-parameters                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* qwen2moe / qwen3moe: an expert's width is expert_feed_forward_length, else n_ff / n_expert_used;
 * the shared expert's is expert_shared_feed_forward_length, else n_ff (as llama.cpp reads them). */
int32_t pie_qwen_moe_hparams(pie_hparams *hp, const struct gguf_context *g) {
    char key[160];
    int64_t v = 0;
    int32_t st;
    hp->n_ff_exp = hp->n_ff / hp->n_expert_used;
    snprintf(key, sizeof(key), "%s.expert_feed_forward_length", hp->arch->name);
    if ((st = pie_gguf_int_opt(g, key, &v)) != PIE_OK) return st;
    if (v != 0) {
        if (v < 0 || v > INT32_MAX) return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' has bad value %lld", key, (long long)v);
        hp->n_ff_exp = (int32_t)v;
    }
    if (hp->n_ff_exp <= 0)
        return pie_set_error(PIE_ERR_FORMAT, "%s has no expert_feed_forward_length and feed_forward_length %d < "
                             "expert_used_count %d", hp->arch->name, hp->n_ff, hp->n_expert_used);
    hp->n_ff_shexp = hp->n_ff;
    v = 0;
    snprintf(key, sizeof(key), "%s.expert_shared_feed_forward_length", hp->arch->name);
    if ((st = pie_gguf_int_opt(g, key, &v)) != PIE_OK) return st;
    if (v != 0) {
        if (v < 0 || v > INT32_MAX) return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' has bad value %lld", key, (long long)v);
        hp->n_ff_shexp = (int32_t)v;
    }
    return PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* The FFN block                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* qwen2moe's shared expert down(silu(gate x) * up x): x [n_embd, n] -> [n_embd, n] */
static struct ggml_tensor *shared_expert(pie_graph *g, const pie_layer *L, struct ggml_tensor *x) {
    struct ggml_tensor *h = ggml_swiglu_split(g->ctx, pie_matmul(g, L->ffn_gate_shexp, x),
                                              pie_matmul(g, L->ffn_up_shexp, x)); /* [n_ff_shexp, n] */
    return pie_matmul(g, L->ffn_down_shexp, h);
}

/* Routed experts: x [n_embd, n] -> [n_embd, n] (llama.cpp's build_moe_ffn: softmax gating, or
 * for gpt-oss biased logits, top-k by logit, softmax over the chosen and swiglu_oai). */
static struct ggml_tensor *moe_ffn(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, int il) {
    struct ggml_context *ctx = g->ctx;
    const pie_hparams *hp = &g->model->hp;
    const int64_t n = x->ne[1], n_embd = x->ne[0], n_exp = hp->n_expert, n_used = hp->n_expert_used;
    const bool oai = hp->arch->needs & PIE_NEED_OAI_MOE;

    struct ggml_tensor *logits = pie_name(pie_matmul(g, L->ffn_gate_inp, x), "ffn_moe_logits", il); /* [n_exp, n] */
    if (L->ffn_gate_inp_b) logits = ggml_add(ctx, logits, L->ffn_gate_inp_b);
    /* gpt-oss picks by logit and weighs by a softmax over the chosen (below) */
    struct ggml_tensor *probs = pie_name(oai ? logits : ggml_soft_max(ctx, logits), "ffn_moe_probs", il); /* [n_exp, n] */
    struct ggml_tensor *selected = pie_name(ggml_argsort_top_k(ctx, probs, (int)n_used), "ffn_moe_topk", il); /* I32 [n_used, n] */
    struct ggml_tensor *weights = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, n_exp, n), selected); /* [1, n_used, n] */
    weights = pie_name(weights, "ffn_moe_weights", il);
    if (oai) {
        struct ggml_tensor *sm = ggml_soft_max(ctx, ggml_reshape_2d(ctx, weights, n_used, n)); /* [n_used, n] */
        weights = pie_name(ggml_reshape_3d(ctx, sm, 1, n_used, n), "ffn_moe_weights_softmax", il);
    }
    if (hp->arch->needs & PIE_MOE_NORM_WEIGHTS) {
        struct ggml_tensor *w2 = ggml_reshape_2d(ctx, weights, n_used, n);           /* [n_used, n] */
        /* the sum is clamped to f16's smallest normal, as llama.cpp does (no division by 0) */
        struct ggml_tensor *sum = ggml_clamp(ctx, ggml_sum_rows(ctx, w2), 6.103515625e-5f, INFINITY); /* [1, n] */
        weights = ggml_reshape_3d(ctx, pie_name(ggml_div(ctx, w2, sum), "ffn_moe_weights_norm", il), 1, n_used, n);
    }

    struct ggml_tensor *x3 = ggml_reshape_3d(ctx, x, n_embd, 1, n);                      /* [n_embd, 1, n] */
    struct ggml_tensor *up = pie_name(pie_matmul_id(g, L->ffn_up_exps, x3, selected), "ffn_moe_up", il);     /* [n_ff_exp, n_used, n] */
    struct ggml_tensor *gate = pie_name(pie_matmul_id(g, L->ffn_gate_exps, x3, selected), "ffn_moe_gate", il); /* [n_ff_exp, n_used, n] */
    struct ggml_tensor *h; /* [n_ff_exp, n_used, n] */
    if (oai) { /* each chosen expert's own biases; swiglu_oai's alpha and limit are llama.cpp's */
        up = pie_name(ggml_add_id(ctx, up, L->ffn_up_exps_b, selected), "ffn_moe_up_biased", il);
        gate = pie_name(ggml_add_id(ctx, gate, L->ffn_gate_exps_b, selected), "ffn_moe_gate_biased", il);
        h = pie_name(ggml_swiglu_oai(ctx, gate, up, 1.702f, 7.0f), "ffn_moe_swiglu_oai", il);
    } else {
        h = pie_name(ggml_swiglu_split(ctx, gate, up), "ffn_moe_swiglu", il);
    }
    struct ggml_tensor *experts = pie_name(pie_matmul_id(g, L->ffn_down_exps, h, selected), "ffn_moe_down", il); /* [n_embd, n_used, n] */
    if (oai) experts = pie_name(ggml_add_id(ctx, experts, L->ffn_down_exps_b, selected), "ffn_moe_down_biased", il);
    experts = pie_name(ggml_mul(ctx, experts, weights), "ffn_moe_weighted", il);

    /* the weighted experts summed in llama.cpp's order: ((e0 + e1) + e2) + ... */
    struct ggml_tensor *out = NULL;
    for (int64_t i = 0; i < n_used; i++) {
        struct ggml_tensor *e = ggml_view_2d(ctx, experts, n_embd, n, experts->nb[2], (size_t)i * experts->nb[1]); /* [n_embd, n] */
        out = out ? ggml_add(ctx, out, e) : e;
    }
    if (n_used == 1) out = ggml_cont(ctx, out);
    out = pie_name(out, "ffn_moe_out", il);

    if (L->ffn_gate_inp_shexp) { /* qwen2moe: + sigmoid(gate_inp_shexp . x) * shared expert */
        struct ggml_tensor *gin = pie_name(pie_matmul(g, L->ffn_gate_inp_shexp, x), "ffn_shexp_gate_inp", il); /* [1, n] */
        /* sigmoid as silu(z) / z, the very ops llama.cpp uses */
        struct ggml_tensor *sig = pie_name(ggml_div(ctx, ggml_silu(ctx, gin), gin), "ffn_shexp_gate", il);    /* [1, n] */
        struct ggml_tensor *sh = pie_name(shared_expert(g, L, x), "ffn_shexp", il); /* [n_embd, n] */
        out = pie_name(ggml_add(ctx, out, ggml_mul(ctx, sh, sig)), "ffn_out", il); /* [n_embd, n] */
    }
    return out;
}

struct ggml_tensor *pie_ffn(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, int il) {
    if (L->ffn_gate_inp) return moe_ffn(g, L, x, il);
    return pie_name(pie_ffn_swiglu(g, L, x), "ffn_out", il);
}

/* ------------------------------------------------------------------------------------------ */
/* OLMoE                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* llama's block (NEOX RoPE) with RMS norms over the whole Q and K rows (all heads at once,
 * weights [n_head * head_dim] and [n_head_kv * head_dim]) before RoPE, and experts. */
void pie_build_olmoe(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;
    const int64_t nt = g->n_tokens;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens] */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q, *k, *v; /* [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, cur, &q, &k, &v);
        /* the norms span every head: [head_dim * n_head(_kv), n_tokens] */
        q = ggml_reshape_2d(ctx, ggml_is_contiguous(q) ? q : ggml_cont(ctx, q), hp->head_dim * hp->n_head, nt);
        k = ggml_reshape_2d(ctx, ggml_is_contiguous(k) ? k : ggml_cont(ctx, k), hp->head_dim * hp->n_head_kv, nt);
        q = pie_name(pie_norm(g, q, L->q_norm), "Qcur_normed", il);
        k = pie_name(pie_norm(g, k, L->k_norm), "Kcur_normed", il);
        q = pie_name(pie_rope(g, ggml_reshape_3d(ctx, q, hp->head_dim, hp->n_head, nt), il), "Qcur", il);
        k = pie_name(pie_rope(g, ggml_reshape_3d(ctx, k, hp->head_dim, hp->n_head_kv, nt), il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        cur = pie_name(pie_attention(g, il, q, k, v, hp->attn_scale), "kqv_out", il); /* [n_head*head_dim_v, n] */
        cur = pie_name(pie_linear(g, L->wo, L->bo, cur), "attn_out", il);          /* [n_embd, n_tokens] */

        if (il == hp->n_layer - 1) {
            cur = pie_select_outputs(g, cur);
            x = pie_select_outputs(g, x);
        }
        x = pie_name(ggml_add(ctx, x, cur), "ffn_inp", il);
        cur = pie_name(pie_norm(g, x, L->ffn_norm), "ffn_norm", il);
        x = pie_name(ggml_add(ctx, x, pie_ffn(g, L, cur, il)), "l_out", il);
    }
    pie_graph_finish(g, x);
}

/* ------------------------------------------------------------------------------------------ */
/* gpt-oss                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Expert width expert_feed_forward_length (required); heads rope.dimension_count wide (llama.cpp
 * sizes Q, K, V by it); a sliding window (required) on every other layer by default, whose layers
 * rotate with their own base (default the global one) and the file's scaling (YaRN). */
int32_t pie_gpt_oss_hparams(pie_hparams *hp, const struct gguf_context *g) {
    char key[160];
    int64_t v = 0;
    snprintf(key, sizeof(key), "%s.expert_feed_forward_length", hp->arch->name);
    int32_t st = pie_gguf_int_opt(g, key, &v);
    if (st != PIE_OK) return st;
    if (v <= 0 || v > INT32_MAX)
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is missing or bad (%lld)", key, (long long)v);
    hp->n_ff_exp = (int32_t)v;
    if (hp->head_dim != hp->n_rot || hp->head_dim_v != hp->n_rot)
        return pie_set_error(PIE_ERR_FORMAT, "%s needs key_length (%d) and value_length (%d) equal to the rope dims (%d)",
                             hp->arch->name, hp->head_dim, hp->head_dim_v, hp->n_rot);
    /* sliding layers: the file's scaling factor even when the scaling type is "none" (llama.cpp
     * copies the trained factor to them before the type is looked at); validated by the loader */
    float factor = 0.0f;
    snprintf(key, sizeof(key), "%s.rope.scale_linear", hp->arch->name);
    pie_gguf_positive(g, key, true, &factor);
    snprintf(key, sizeof(key), "%s.rope.scaling.factor", hp->arch->name);
    pie_gguf_positive(g, key, true, &factor);
    hp->rope_scale_swa = factor == 0.0f ? 1.0f : 1.0f / factor;
    hp->rope_base_swa = hp->rope_base;
    snprintf(key, sizeof(key), "%s.rope.freq_base_swa", hp->arch->name);
    if ((st = pie_gguf_positive(g, key, false, &hp->rope_base_swa)) != PIE_OK) return st;
    /* every other layer slides by default */
    if ((st = pie_load_swa(hp, g, 0, 2)) != PIE_OK) return st;
    if (hp->sliding_window == 0)
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s.attention.sliding_window' is missing or 0", hp->arch->name);
    return PIE_OK;
}

/* Pre-norm blocks: biased attention with learned sinks, the post-attention norm before the
 * experts; like llama.cpp, the last layer runs over every row and the sampled rows are kept
 * after it. */
void pie_build_gpt_oss(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens] */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q, *k, *v; /* [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, cur, &q, &k, &v);
        q = pie_name(pie_rope(g, q, il), "Qcur", il);
        k = pie_name(pie_rope(g, k, il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        cur = pie_name(pie_attention(g, il, q, k, v, hp->attn_scale), "kqv_out", il); /* [n_head*head_dim_v, n] */
        cur = pie_name(pie_linear(g, L->wo, L->bo, cur), "attn_out", il);          /* [n_embd, n_tokens] */

        x = pie_name(ggml_add(ctx, x, cur), "ffn_inp", il);
        cur = pie_name(pie_norm(g, x, L->attn_post_norm), "attn_post_norm", il);
        x = pie_name(ggml_add(ctx, x, pie_ffn(g, L, cur, il)), "l_out", il);
    }
    pie_graph_finish(g, pie_select_outputs(g, x));
}
