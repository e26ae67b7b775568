/*
 * gemma3n.c — Gemma 3n (E2B, E4B): a Gemma 3 layer (pre- and post-norms, per-head Q/K norms,
 * NEOX RoPE, every 5th layer global, the others sliding) inside three additions, and KV sharing:
 *   per-layer embeddings: each token has a small extra embedding per layer (n_embd_altup wide),
 *     mixed with a projection of its input embedding, and each layer gates it into its output;
 *   AltUp: the hidden state is n_altup streams; a layer computes on one (i_altup_act), after a
 *     router-weighted prediction of every stream from all of them, then corrects all streams
 *     from what it computed; the extra streams start as projections of the embedding and are
 *     projected back and averaged in at the end (both times rescaled to the active stream's norm);
 *   LAuReL: a low-rank residual branch beside attention;
 *   activation sparsity: the FFN gate of the first layers keeps only values above
 *     mean + k * std of its row (a Gaussian top-k), the others are 0 after the ReLU;
 *   V is RMS-normed (no weight), Q.K is not scaled (Q and K are normed), final logits capped;
 *   the last layers (n_layer - n_layer_kv) write no KV: each attends over the KV of the last
 *     KV-owning layer of its kind (sliding or global), as llama.cpp's layer reuse does.
 * Names of intermediate tensors follow llama.cpp's graph.
 */
#include "../internal.h"

#include <math.h>
#include <stdint.h>

/* ------------------------------------------------------------------------------------------ */
/* Hyper-parameters                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* llama.cpp's fixed values, used when the file has no key for them */
enum { GEMMA3N_KV_LAYERS = 20, GEMMA3N_SPARSE_LAYERS = 10, GEMMA3N_MAX_ALTUP = 16 };
static const float GEMMA3N_SPARSE_STD = 1.6448533535003662f; /* the normal distribution's 95% quantile */

/* One integer key in lo .. hi: `*out` keeps its default when absent. */
static int32_t int_in(const struct gguf_context *g, const char *key, int64_t lo, int64_t hi, int64_t *out) {
    int32_t st = pie_gguf_int_opt(g, key, out);
    if (st != PIE_OK) return st;
    if (*out < lo || *out > hi)
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is %lld; it must be %lld .. %lld", key, (long long)*out,
                             (long long)lo, (long long)hi);
    return PIE_OK;
}

/* gemma3n.activation_sparsity_scale: per layer the std multiplier of the Gaussian top-k (the
 * normal quantile of the kept share; -inf: no sparsity); absent: llama.cpp's first 10 layers at
 * the 95% quantile. */
static int32_t load_sparsity(pie_hparams *hp, const struct gguf_context *g) {
    const char *key = "gemma3n.activation_sparsity_scale";
    const int64_t id = gguf_find_key(g, key);
    if (id < 0) {
        for (int il = 0; il < hp->n_layer; il++) {
            hp->sparse_ffn[il] = il < GEMMA3N_SPARSE_LAYERS;
            hp->sparse_std[il] = GEMMA3N_SPARSE_STD;
        }
    } else {
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != GGUF_TYPE_FLOAT32 ||
            (int64_t)gguf_get_arr_n(g, id) != hp->n_layer)
            return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' must hold %d float32 values (one per layer)", key,
                                 hp->n_layer);
        const float *v = gguf_get_arr_data(g, id);
        for (int il = 0; il < hp->n_layer; il++) {
            if (isnan(v[il]) || v[il] == INFINITY)
                return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' holds %g for layer %d; it must be finite or -inf",
                                     key, (double)v[il], il);
            hp->sparse_ffn[il] = v[il] != -INFINITY;
            hp->sparse_std[il] = v[il];
        }
    }
    for (int il = 0; il < hp->n_layer; il++)
        if (hp->sparse_ffn[il] && hp->n_ff < 2) /* the std divides by n_ff - 1 */
            return pie_set_error(PIE_ERR_FORMAT, "feed_forward_length %d is too small for activation sparsity", hp->n_ff);
    return PIE_OK;
}

/*
 * KV sharing: gemma3n.attention.shared_kv_layers (absent: every layer from the 20th, llama.cpp's
 * fixed count) read KV instead of writing it; a sliding layer reads the last KV-owning layer but
 * one, a global layer the last (llama.cpp's rule, which assumes those are sliding and global).
 */
static int32_t load_kv_sharing(pie_hparams *hp, const struct gguf_context *g) {
    int64_t shared = hp->n_layer > GEMMA3N_KV_LAYERS ? hp->n_layer - GEMMA3N_KV_LAYERS : 0;
    int32_t st = int_in(g, "gemma3n.attention.shared_kv_layers", 0, hp->n_layer, &shared);
    if (st != PIE_OK) return st;
    hp->n_layer_kv = hp->n_layer - (int32_t)shared;
    if (shared == 0) return PIE_OK;
    if (hp->n_layer_kv < 2)
        return pie_set_error(PIE_ERR_FORMAT, "gemma3n.attention.shared_kv_layers is %lld of %d layers; at least 2 must own "
                             "their KV", (long long)shared, hp->n_layer);
    for (int il = hp->n_layer_kv; il < hp->n_layer; il++) {
        const int src = hp->n_layer_kv - (hp->is_swa[il] ? 2 : 1);
        if (hp->is_swa[src] != hp->is_swa[il])
            return pie_set_error(PIE_ERR_FORMAT, "layer %d (%s) would share the KV of layer %d, which is %s: the sliding-"
                                 "window pattern does not fit gemma3n's KV sharing", il,
                                 hp->is_swa[il] ? "sliding" : "global", src, hp->is_swa[src] ? "sliding" : "global");
        hp->kv_layer[il] = src;
    }
    return PIE_OK;
}

int32_t pie_gemma3n_hparams(pie_hparams *hp, const struct gguf_context *g) {
    hp->embd_scale = sqrtf((float)hp->n_embd);
    hp->attn_scale = 1.0f; /* Q and K are normed; Q.K is not scaled */
    hp->logit_softcap = 30.0f;
    int32_t st = pie_gguf_positive(g, "gemma3n.final_logit_softcapping", false, &hp->logit_softcap);
    if (st != PIE_OK) return st;

    /* the window is required (llama.cpp reads it without a default) */
    const char *key = "gemma3n.attention.sliding_window";
    int64_t window = 0;
    if (!pie_gguf_int(g, key, &window))
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is missing or not an integer", key);
    if (window <= 0 || window > INT32_MAX)
        return pie_set_error(PIE_ERR_FORMAT, "%s is %lld; it must be from 1 to %d", key, (long long)window, INT32_MAX);
    if ((st = pie_load_swa(hp, g, window, 5)) != PIE_OK ||
        (st = pie_gguf_positive(g, "gemma3n.rope.freq_base_swa", false, &hp->rope_base_swa)) != PIE_OK)
        return st;

    int64_t n_altup = 4, act = 0, per_layer = 256;
    if ((st = int_in(g, "gemma3n.altup.num_inputs", 2, GEMMA3N_MAX_ALTUP, &n_altup)) ||
        (st = int_in(g, "gemma3n.altup.active_idx", 0, n_altup - 1, &act)) ||
        (st = int_in(g, "gemma3n.embedding_length_per_layer_input", 1, INT32_MAX / hp->n_layer, &per_layer)))
        return st;
    hp->n_altup = (int32_t)n_altup;
    hp->i_altup_act = (int32_t)act;
    hp->n_embd_altup = (int32_t)per_layer;
    if ((st = load_sparsity(hp, g)) != PIE_OK) return st;
    return load_kv_sharing(hp, g);
}

/* ------------------------------------------------------------------------------------------ */
/* Graph                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Slice i of x [ne0, ne1, ne2] along its last dim: [ne0, ne1] (contiguous). */
static struct ggml_tensor *slice(struct ggml_context *ctx, struct ggml_tensor *x, int64_t i) {
    return ggml_view_2d(ctx, x, x->ne[0], x->ne[1], x->nb[1], x->nb[2] * (size_t)i);
}

/* Euclidean norm of each row: [ne0, ne1, ne2] -> [1, ne1, ne2]. */
static struct ggml_tensor *magnitude(struct ggml_context *ctx, struct ggml_tensor *x) {
    return ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, x)));
}

/* w_i x_i for each matrix w_i of the stack w [ne0, ne1, k]: x_i is slice `first + i` of
 * x [ne0, n, ...], or x [ne0, n] itself for first < 0. Returns [ne1, n, k], each product
 * batch-invariant (pie_matmul). */
static struct ggml_tensor *stacked_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x, int64_t first) {
    struct ggml_context *ctx = g->ctx;
    struct ggml_tensor *out = NULL;
    for (int64_t i = 0; i < w->ne[2]; i++) {
        struct ggml_tensor *wi = ggml_view_2d(ctx, w, w->ne[0], w->ne[1], w->nb[1], w->nb[2] * (size_t)i); /* [ne0, ne1] */
        struct ggml_tensor *xi = first < 0 ? x : slice(ctx, x, first + i);                                /* [ne0, n]   */
        struct ggml_tensor *yi = pie_matmul(g, wi, xi);                                                    /* [ne1, n]   */
        out = out ? ggml_concat(ctx, out, yi, 2) : yi;
    }
    return out;
}

/* The per-layer inputs of every token: its per-layer embedding (scaled by sqrt(n_embd_altup))
 * plus the RMS-normed projection of its scaled input embedding x [n_embd, n], over sqrt(2).
 * Returns [n_embd_altup, n_tokens, n_layer]. */
static struct ggml_tensor *per_layer_inputs(pie_graph *g, struct ggml_tensor *x) {
    struct ggml_context *ctx = g->ctx;
    const pie_hparams *hp = &g->model->hp;
    const pie_weights *w = &g->model->w;
    const int64_t P = hp->n_embd_altup, NL = hp->n_layer, n = g->n_tokens;
    struct ggml_tensor *sel = ggml_get_rows(ctx, w->per_layer_tok_embd, g->tokens);       /* [P * NL, n]  */
    sel = ggml_scale(ctx, ggml_reshape_3d(ctx, sel, P, NL, n), sqrtf((float)P));          /* [P, NL, n]   */
    sel = pie_name(sel, "inp_per_layer_selected", -1);
    struct ggml_tensor *proj = pie_matmul(g, w->per_layer_model_proj, x);                 /* [P * NL, n]  */
    proj = ggml_scale(ctx, proj, 1.0f / sqrtf((float)hp->n_embd));
    proj = pie_norm(g, ggml_reshape_3d(ctx, proj, P, NL, n), w->per_layer_proj_norm);     /* [P, NL, n]   */
    proj = pie_name(proj, "per_layer_proj", -1);
    struct ggml_tensor *inp = ggml_scale(ctx, ggml_add(ctx, proj, sel), 1.0f / sqrtf(2.0f));
    inp = pie_name(inp, "inp_per_layer", -1);                                             /* [P, NL, n]   */
    return ggml_cont(ctx, ggml_permute(ctx, inp, 0, 2, 1, 3));                            /* [P, n, NL]   */
}

/* The AltUp streams at the start: x [n_embd, n] and its projections into the other streams,
 * rescaled to x's norm. Returns [n_embd, n, n_altup]. */
static struct ggml_tensor *altup_stack(pie_graph *g, struct ggml_tensor *x) {
    struct ggml_context *ctx = g->ctx;
    struct ggml_tensor *target = magnitude(ctx, x);                                      /* [1, n]                 */
    struct ggml_tensor *added = stacked_matmul(g, g->model->w.altup_proj, x, -1);        /* [n_embd, n, n_altup-1] */
    added = ggml_div(ctx, ggml_mul(ctx, added, target), magnitude(ctx, added));
    return pie_name(ggml_concat(ctx, x, added, 2), "inp_stacked", -1);                   /* [n_embd, n, n_altup]   */
}

/* The streams merged back into one: the others projected out and rescaled to the active
 * stream's norm, then the mean of stream 0 and those. s: [n_embd, n, n_altup] -> [n_embd, n]. */
static struct ggml_tensor *altup_merge(pie_graph *g, struct ggml_tensor *s) {
    struct ggml_context *ctx = g->ctx;
    const pie_hparams *hp = &g->model->hp;
    struct ggml_tensor *target = magnitude(ctx, slice(ctx, s, hp->i_altup_act));          /* [1, n]                 */
    struct ggml_tensor *un = stacked_matmul(g, g->model->w.altup_unembd_proj, s, 1);      /* [n_embd, n, n_altup-1] */
    un = pie_name(ggml_div(ctx, ggml_mul(ctx, un, target), magnitude(ctx, un)), "altup_unembd", -1);
    struct ggml_tensor *cur = slice(ctx, s, 0);                                           /* [n_embd, n]            */
    for (int64_t i = 0; i < hp->n_altup - 1; i++) cur = ggml_add(ctx, cur, slice(ctx, un, i));
    return pie_name(ggml_scale(ctx, cur, 1.0f / (float)hp->n_altup), "unembd_merged", -1);
}

/* The router's weights of the streams for x [n_embd, n]: tanh(W norm(x) / n_embd): [n_altup, n]. */
static struct ggml_tensor *altup_router(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, int il) {
    struct ggml_context *ctx = g->ctx;
    x = ggml_scale(ctx, pie_norm(g, x, L->altup_router_norm), 1.0f / (float)g->model->hp.n_embd);
    return pie_name(ggml_tanh(ctx, pie_matmul(g, L->altup_router, x)), "modalities", il);
}

/* Every stream predicted as itself plus a router-weighted mix of all streams (per token an
 * [n_altup, n_altup] matrix). s: [n_embd, n, n_altup] -> [n_embd, n, n_altup]. */
static struct ggml_tensor *altup_predict(pie_graph *g, const pie_layer *L, struct ggml_tensor *s, int il) {
    struct ggml_context *ctx = g->ctx;
    const int64_t A = g->model->hp.n_altup;
    struct ggml_tensor *mod = altup_router(g, L, slice(ctx, s, g->model->hp.i_altup_act), il); /* [A, n]         */
    struct ggml_tensor *coefs = pie_matmul(g, L->altup_predict_coef, mod);                   /* [A * A, n]     */
    coefs = ggml_reshape_3d(ctx, coefs, A, A, g->n_tokens);                                  /* [A, A, n]      */
    struct ggml_tensor *sp = ggml_cont(ctx, ggml_permute(ctx, s, 1, 2, 0, 3));               /* [A, n_embd, n] */
    struct ggml_tensor *pred = ggml_mul_mat(ctx, sp, coefs);                                 /* [n_embd, A, n] */
    pred = ggml_cont(ctx, ggml_permute(ctx, pred, 0, 2, 1, 3));                              /* [n_embd, n, A] */
    return pie_name(ggml_add(ctx, pred, s), "predictions", il);
}

/* Every stream corrected by the layer's innovation (its output minus its predicted input), times
 * 1 + a router-weighted coefficient per stream. pred: [n_embd, n, n_altup], out: [n_embd, n]. */
static struct ggml_tensor *altup_correct(pie_graph *g, const pie_layer *L, struct ggml_tensor *pred,
                                         struct ggml_tensor *out, int il) {
    struct ggml_context *ctx = g->ctx;
    const pie_hparams *hp = &g->model->hp;
    const int64_t n = g->n_tokens;
    struct ggml_tensor *mod = altup_router(g, L, out, il);                                        /* [A, n]         */
    struct ggml_tensor *innov = ggml_sub(ctx, out, slice(ctx, pred, hp->i_altup_act));            /* [n_embd, n]    */
    struct ggml_tensor *coefs = ggml_scale_bias(ctx, pie_matmul(g, L->altup_correct_coef, mod), 1.0f, 1.0f); /* [A, n] */
    coefs = ggml_cont_3d(ctx, ggml_transpose(ctx, coefs), 1, n, hp->n_altup);                     /* [1, n, A]      */
    innov = ggml_repeat_4d(ctx, innov, hp->n_embd, n, hp->n_altup, 1);                            /* [n_embd, n, A] */
    return pie_name(ggml_add(ctx, ggml_mul(ctx, innov, coefs), pred), "corrected", il);
}

/* LAuReL: x + norm(R L x). x: [n_embd, n] -> [n_embd, n]. */
static struct ggml_tensor *laurel(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, int il) {
    struct ggml_tensor *t = pie_matmul(g, L->laurel_r, pie_matmul(g, L->laurel_l, x)); /* [rank, n] -> [n_embd, n] */
    t = pie_norm(g, t, L->laurel_post_norm);
    return pie_name(ggml_add(g->ctx, t, x), "laurel_out", il);
}

/* Gaussian top-k of each row of x [n_ff, n]: relu(x - (mean + k * std)), std with n_ff - 1. */
static struct ggml_tensor *gaussian_topk(struct ggml_context *ctx, struct ggml_tensor *x, float k) {
    struct ggml_tensor *mean = ggml_mean(ctx, x);                                               /* [1, n] */
    struct ggml_tensor *var = ggml_sum_rows(ctx, ggml_sqr(ctx, ggml_sub(ctx, x, mean)));       /* [1, n] */
    struct ggml_tensor *std = ggml_sqrt(ctx, ggml_scale(ctx, var, 1.0f / (float)(x->ne[0] - 1)));
    struct ggml_tensor *cutoff = ggml_add(ctx, mean, ggml_scale(ctx, std, k));                 /* [1, n] */
    return ggml_relu(ctx, ggml_sub(ctx, x, cutoff));                                           /* [n_ff, n] */
}

/* Attention of layer il on x [n_embd, n] (after attn_norm): [n_embd, n]. */
static struct ggml_tensor *attention(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, int il) {
    struct ggml_context *ctx = g->ctx;
    const pie_hparams *hp = &g->model->hp;
    struct ggml_tensor *q, *k = NULL, *v = NULL; /* [head_dim, n_head(_kv), n] */
    if (il < hp->n_layer_kv) {
        pie_qkv(g, L, x, &q, &k, &v);
        k = pie_name(pie_norm(g, k, L->k_norm), "Kcur_normed", il);
        v = pie_name(ggml_rms_norm(ctx, v, hp->rms_eps), "Vcur_normed", il);
        k = pie_name(pie_rope(g, k, il), "Kcur_pos", il);
    } else if (L->wqkv) { /* Q alone: the K and V rows are not used */
        struct ggml_tensor *k_unused, *v_unused;
        pie_qkv(g, L, x, &q, &k_unused, &v_unused);
    } else {
        q = ggml_reshape_3d(ctx, pie_linear(g, L->wq, L->bq, x), hp->head_dim, hp->n_head, g->n_tokens);
    }
    q = pie_name(pie_norm(g, q, L->q_norm), "Qcur_normed", il);
    q = pie_name(pie_rope(g, q, il), "Qcur_pos", il);
    struct ggml_tensor *cur = pie_attention(g, il, q, k, v, hp->attn_scale);  /* [n_head*head_dim_v, n] */
    return pie_linear(g, L->wo, NULL, pie_name(cur, "kqv_out", il));          /* [n_embd, n]            */
}

/* Layer il on the streams s [n_embd, n, n_altup]; pl: the per-layer inputs [n_embd_altup, n, n_layer]. */
static struct ggml_tensor *layer(pie_graph *g, struct ggml_tensor *s, struct ggml_tensor *pl, int il) {
    struct ggml_context *ctx = g->ctx;
    const pie_hparams *hp = &g->model->hp;
    const pie_layer *L = &g->model->w.layers[il];

    struct ggml_tensor *pred = altup_predict(g, L, s, il);                                       /* [n_embd, n, A] */
    struct ggml_tensor *active = pie_name(slice(ctx, pred, hp->i_altup_act), "active_prediction", il); /* [n_embd, n] */
    struct ggml_tensor *cur = pie_name(pie_norm(g, active, L->attn_norm), "attn_norm", il);
    struct ggml_tensor *lau = laurel(g, L, cur, il);                                             /* [n_embd, n] */

    cur = pie_name(pie_norm(g, attention(g, L, cur, il), L->attn_post_norm), "attn_post_norm", il);
    cur = pie_name(ggml_add(ctx, cur, active), "attn_gated", il);
    struct ggml_tensor *attn_laurel = ggml_scale(ctx, ggml_add(ctx, cur, lau), 1.0f / sqrtf(2.0f));
    attn_laurel = pie_name(attn_laurel, "attn_laurel", il);                                      /* [n_embd, n] */

    /* feed-forward: gelu(gate) * up, the gate sparsified first in the first layers */
    cur = pie_name(pie_norm(g, attn_laurel, L->ffn_norm), "ffn_norm", il);
    if (hp->sparse_ffn[il]) {
        struct ggml_tensor *up = pie_matmul(g, L->ffn_up, cur);                                  /* [n_ff, n] */
        struct ggml_tensor *gate = gaussian_topk(ctx, pie_matmul(g, L->ffn_gate, cur), hp->sparse_std[il]);
        cur = ggml_mul(ctx, up, ggml_gelu(ctx, gate));
    } else {
        cur = pie_geglu(g, L->ffn_gate, L->ffn_up, cur); /* [n_ff, n]: the same gelu(gate) * up */
    }
    cur = pie_name(pie_matmul(g, L->ffn_down, cur), "ffn_out", il);                             /* [n_embd, n] */
    cur = pie_name(pie_norm(g, cur, L->ffn_post_norm), "ffn_post_norm", il);
    cur = pie_name(ggml_add(ctx, cur, attn_laurel), "attn_ffw_laurel_gated", il);

    struct ggml_tensor *corr = altup_correct(g, L, pred, cur, il);                               /* [n_embd, n, A] */

    /* the per-layer input, gated by the corrected active stream, added to the other streams */
    struct ggml_tensor *first = ggml_mul(ctx, slice(ctx, corr, hp->i_altup_act), L->altup_correct_scale);
    first = ggml_gelu(ctx, pie_matmul(g, L->inp_gate, first));                                   /* [n_embd_altup, n] */
    first = pie_name(ggml_mul(ctx, first, slice(ctx, pl, il)), "first_prediction_scaled", il);
    first = pie_norm(g, pie_matmul(g, L->proj, first), L->post_norm);                            /* [n_embd, n] */
    first = pie_name(first, "first_prediction_out", il);
    struct ggml_tensor *rest = ggml_view_3d(ctx, corr, hp->n_embd, g->n_tokens, hp->n_altup - 1, corr->nb[1], corr->nb[2],
                                            corr->nb[2]);                                         /* [n_embd, n, A-1] */
    rest = ggml_add(ctx, rest, first);
    return pie_name(ggml_concat(ctx, slice(ctx, corr, 0), rest, 2), "l_out", il);               /* [n_embd, n, A] */
}

void pie_build_gemma3n(pie_graph *g) {
    const pie_hparams *hp = &g->model->hp;
    struct ggml_tensor *x = pie_embed(g);                     /* [n_embd, n_tokens], scaled by sqrt(n_embd) */
    struct ggml_tensor *pl = per_layer_inputs(g, x);          /* [n_embd_altup, n_tokens, n_layer]          */
    struct ggml_tensor *s = altup_stack(g, x);                /* [n_embd, n_tokens, n_altup]                */
    for (int il = 0; il < hp->n_layer; il++) s = layer(g, s, pl, il);
    /* every row runs to the merge of the streams, the sampled ones are kept after it (llama.cpp) */
    x = pie_select_outputs(g, altup_merge(g, s));             /* [n_embd, n_outputs]                        */
    pie_graph_finish(g, x);
}

/* Graph nodes beyond a usual layer's: per layer ~90 more ops and 8 more matrices (router twice,
 * AltUp's two coefficient products, LAuReL's pair, the per-layer gate and projection), each up
 * to 3 more nodes when a lone row is paired with zeros (pie_matmul); around the layers ~40 ops
 * and 2 (n_altup - 1) + 1 matrices; 3 nodes per piece of a split product. Measured on the tiny
 * model: a one-token decode builds 3450 nodes, this estimate with the common one gives 5225. */
size_t pie_gemma3n_nodes(const pie_hparams *hp, size_t n_pieces) {
    const size_t layer = 112 + 3 * 8 * n_pieces, outer = 48 + 3 * (2 * (size_t)hp->n_altup - 1) * (n_pieces + 1);
    return (size_t)hp->n_layer * layer + outer;
}
