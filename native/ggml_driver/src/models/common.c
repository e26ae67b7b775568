/*
 * common.c — graph building blocks every architecture family shares: inputs, RMS norm, RoPE,
 * paged attention, linear layers and the output head. Families compose these in models/<family>.c.
 *
 * Shapes follow ggml (ne0 first): a batch of hidden states is [n_embd, n_tokens].
 */
#include "../internal.h"

#include <math.h>

static struct ggml_tensor *input(pie_graph *g, enum ggml_type type, int64_t n, const char *name) {
    struct ggml_tensor *t = ggml_new_tensor_1d(g->ctx, type, n);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

void pie_graph_begin(pie_graph *g) {
    const pie_plan *p = &g->model->plan;
    g->plan      = p;
    g->n_tokens  = p->n_tokens;
    g->n_outputs = p->n_outputs;
    g->tokens      = input(g, GGML_TYPE_I32, g->n_tokens, "tokens");     /* [n_tokens]  */
    g->positions   = input(g, GGML_TYPE_I32, g->n_tokens, "positions");  /* [n_tokens]  */
    g->write_rows  = input(g, GGML_TYPE_I64, g->n_tokens, "write_rows"); /* [n_tokens]  */
    g->gather_rows = p->n_gather > 0 ? input(g, GGML_TYPE_I32, p->n_gather, "gather_rows") : NULL;
    g->mask        = input(g, GGML_TYPE_F16, p->n_mask, "mask");         /* [n_mask]    */
    g->mask_swa    = p->any_swa_mask ? input(g, GGML_TYPE_F16, p->n_mask, "mask_swa") : NULL;
    g->out_rows    = input(g, GGML_TYPE_I32, g->n_outputs, "out_rows");  /* [n_outputs] */
}

/* Names an intermediate tensor as llama.cpp's graph callback does: "<name>-<layer>", or the
 * bare name for il < 0. Builders name the same tensors llama.cpp names, with its names
 * ("attn_norm", "Qcur", "kqv_out", "ffn_out", "l_out", "result_norm", ...), so activations read
 * through pie_set_activation_callback compare with llama.cpp's name by name. */
struct ggml_tensor *pie_name(struct ggml_tensor *t, const char *name, int il) {
    if (il >= 0) ggml_format_name(t, "%s-%d", name, il);
    else ggml_set_name(t, name);
    return t;
}

/* Token embeddings, scaled: [n_embd, n_tokens] */
struct ggml_tensor *pie_embed(pie_graph *g) {
    const pie_model *m = g->model;
    struct ggml_tensor *x = pie_name(ggml_get_rows(g->ctx, m->w.tok_embd, g->tokens), "embd", -1);
    if (m->hp.embd_scale != 1.0f) x = pie_name(ggml_scale(g->ctx, x, m->hp.embd_scale), "inp_scaled", -1);
    return x;
}

/* RMS norm over ne0, times the weight (broadcast over the other dims). */
struct ggml_tensor *pie_norm(pie_graph *g, struct ggml_tensor *x, struct ggml_tensor *w) {
    x = ggml_rms_norm(g->ctx, x, g->model->hp.rms_eps);
    return ggml_mul(g->ctx, x, w);
}

struct ggml_tensor *pie_linear(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *b, struct ggml_tensor *x) {
    x = ggml_mul_mat(g->ctx, w, x);
    return b ? ggml_add(g->ctx, x, b) : x;
}

/* x: [head_dim, n_heads, n_tokens], rotated at the batch's explicit positions. Sliding-window
 * layers use their own base and no scaling (as llama.cpp does). */
struct ggml_tensor *pie_rope(pie_graph *g, struct ggml_tensor *x, int il) {
    const pie_hparams *hp = &g->model->hp;
    const bool swa = hp->is_swa[il];
    return ggml_rope_ext(g->ctx, x, g->positions, g->model->w.rope_freqs, hp->n_rot, hp->rope_mode, hp->n_ctx_train,
                         swa ? hp->rope_base_swa : hp->rope_base, swa ? 1.0f : hp->rope_scale,
                         0.0f /* ext_factor */, 1.0f /* attn_factor */, 32.0f /* beta_fast */, 1.0f /* beta_slow */);
}

/* Joins parts[0..n) along dim in order, pairwise by rounds so each row is copied log2(n)
 * times at most; overwrites parts. */
static struct ggml_tensor *concat_all(struct ggml_context *ctx, struct ggml_tensor **parts, int n, int dim) {
    while (n > 1) {
        int k = 0;
        for (int i = 0; i + 1 < n; i += 2) parts[k++] = ggml_concat(ctx, parts[i], parts[i + 1], dim);
        if (n % 2) parts[k++] = parts[n - 1];
        n = k;
    }
    return parts[0];
}

/* Request r's K or V as [width_head, n_kv, n_head_kv], on the pool's own f16/q8_0 values
 * whichever way it is read, so attention runs the same kernels on the same values and page
 * placement never changes a result:
 *   one run of consecutive pages: a view of the pool (no copy);
 *   a few runs: views joined by concat into [width_head * n_head_kv, 1, n_kv] (one f16 copy);
 *   otherwise: rows gathered (get_rows yields F32) and cast back to the pool's type (lossless). */
static struct ggml_tensor *request_kv(pie_graph *g, struct ggml_tensor *pool, const pie_plan_req *q, int64_t head) {
    struct ggml_context *ctx = g->ctx;
    const int64_t hkv = g->model->hp.n_head_kv;
    const pie_kv_run *run = g->plan->runs + q->run_off;
    if (q->n_runs == 1)
        return ggml_view_3d(ctx, pool, head, q->n_kv, hkv, pool->nb[1], ggml_row_size(pool->type, head),
                            pool->nb[1] * (size_t)run->start);
    struct ggml_tensor *kv; /* [head * hkv, n_kv] (or [head * hkv, 1, n_kv]) */
    if (q->n_runs > 1) {
        /* rows along dim 2: ggml's concat splits dim 2 between threads */
        struct ggml_tensor *parts[PIE_MAX_KV_RUNS];
        for (int32_t i = 0; i < q->n_runs; i++)
            parts[i] = ggml_view_3d(ctx, pool, pool->ne[0], 1, run[i].len, pool->nb[1], pool->nb[1],
                                    pool->nb[1] * (size_t)run[i].start); /* [head * hkv, 1, len] */
        kv = concat_all(ctx, parts, q->n_runs, 2);
    } else {
        struct ggml_tensor *rows = ggml_view_1d(ctx, g->gather_rows, q->n_kv, sizeof(int32_t) * (size_t)q->gather_off);
        kv = ggml_cast(ctx, ggml_get_rows(ctx, pool, rows), pool->type);
    }
    return ggml_permute(ctx, ggml_reshape_3d(ctx, kv, head, hkv, q->n_kv), 0, 2, 1, 3);
}

/*
 * Paged attention of layer il.
 *   q: [head_dim,   n_head,    n_tokens]   (roped)
 *   k: [head_dim,   n_head_kv, n_tokens]   (roped)
 *   v: [head_dim_v, n_head_kv, n_tokens]
 * The new K/V rows of every request go into the pool at write_rows in one op; then each request
 * attends over its own KV under its own mask block (causal, custom BRLE, sliding window), and
 * the per-request results are concatenated back in batch order. kq_scale multiplies Q.K.
 * Returns [head_dim_v * n_head, n_tokens].
 */
struct ggml_tensor *pie_attention(pie_graph *g, int il, struct ggml_tensor *q, struct ggml_tensor *k,
                                  struct ggml_tensor *v, float kq_scale) {
    struct ggml_context *ctx = g->ctx;
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    const pie_plan *p = g->plan;
    const int64_t nt = g->n_tokens, hkv = hp->n_head_kv;

    /* write: [width, n_tokens] rows into the flat pools; the results are views of the pools, and
     * reading through them orders every read after the write */
    struct ggml_tensor *kp = ggml_set_rows(ctx, m->kv.k[il], ggml_reshape_2d(ctx, k, hp->head_dim * hkv, nt), g->write_rows);
    struct ggml_tensor *vp = ggml_set_rows(ctx, m->kv.v[il], ggml_reshape_2d(ctx, v, hp->head_dim_v * hkv, nt), g->write_rows);
    struct ggml_tensor *mask = hp->is_swa[il] && g->mask_swa ? g->mask_swa : g->mask;

    /* per-request results, merged pairwise (a balanced tree keeps the copying O(n log n)) */
    struct ggml_tensor *parts[64];
    int n_parts = 0;
    for (int32_t r = 0; r < p->n_requests; r++) {
        const pie_plan_req *rq = &p->reqs[r];
        struct ggml_tensor *qr = ggml_view_3d(ctx, q, hp->head_dim, hp->n_head, rq->n_q, q->nb[1], q->nb[2], q->nb[2] * (size_t)rq->q0);
        qr = ggml_permute(ctx, qr, 0, 2, 1, 3); /* [head_dim, n_q, n_head] */
        struct ggml_tensor *mr = ggml_view_2d(ctx, mask, rq->n_kv, rq->n_q, sizeof(ggml_fp16_t) * (size_t)rq->n_kv,
                                              sizeof(ggml_fp16_t) * (size_t)rq->mask_off); /* [n_kv, n_q] */
        struct ggml_tensor *out = ggml_flash_attn_ext(ctx, qr, request_kv(g, kp, rq, hp->head_dim),
                                                      request_kv(g, vp, rq, hp->head_dim_v), mr, kq_scale, 0.0f, 0.0f);
        ggml_prec_set_acc(out, GGML_PREC_F32); /* out: [head_dim_v, n_head, n_q] */
        /* merge like a binary counter: equal-sized neighbours first */
        parts[n_parts++] = out;
        for (int32_t c = r + 1; (c & 1) == 0 && n_parts > 1; c >>= 1, n_parts--)
            parts[n_parts - 2] = ggml_concat(ctx, parts[n_parts - 2], parts[n_parts - 1], 2);
    }
    while (n_parts > 1) {
        parts[n_parts - 2] = ggml_concat(ctx, parts[n_parts - 2], parts[n_parts - 1], 2);
        n_parts--;
    }
    return ggml_reshape_2d(ctx, parts[0], hp->head_dim_v * hp->n_head, nt);
}

/* Keeps only the rows the batch samples: [n, n_tokens] -> [n, n_outputs] */
struct ggml_tensor *pie_select_outputs(pie_graph *g, struct ggml_tensor *x) {
    return ggml_get_rows(g->ctx, x, g->out_rows);
}

/* x: [n_embd, n_outputs] -> hidden (after the output norm) and logits [n_vocab, n_outputs].
 * A batch that samples nothing (a prefill chunk) stops at the hidden state: the LM head is the
 * largest matrix of a small model. */
void pie_graph_finish(pie_graph *g, struct ggml_tensor *x) {
    const pie_model *m = g->model;
    g->hidden = pie_name(pie_norm(g, x, m->w.output_norm), "result_norm", -1);
    ggml_set_output(g->hidden);
    ggml_build_forward_expand(g->gf, g->hidden);
    if (!g->plan->head) return;
    struct ggml_tensor *logits = ggml_mul_mat(g->ctx, m->w.output, g->hidden);
    const float cap = m->hp.logit_softcap;
    if (cap > 0.0f) logits = ggml_scale(g->ctx, ggml_tanh(g->ctx, ggml_scale(g->ctx, logits, 1.0f / cap)), cap);
    g->logits = pie_name(logits, "result_output", -1);
    ggml_set_output(g->logits);
    ggml_build_forward_expand(g->gf, g->logits);
}
