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
    g->zeros       = NULL; /* created by the first product that needs it */
    g->layout      = &p->token_layout;
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

/* Joins tensors along one dimension as they come, like a binary counter (equal-sized neighbours
 * first), so each element is copied O(log n) times. */
typedef struct {
    struct ggml_tensor *parts[64];
    int n, count, dim;
} pie_joiner;

static void join_push(struct ggml_context *ctx, pie_joiner *j, struct ggml_tensor *t) {
    j->parts[j->n++] = t;
    for (int c = ++j->count; (c & 1) == 0 && j->n > 1; c >>= 1, j->n--)
        j->parts[j->n - 2] = ggml_concat(ctx, j->parts[j->n - 2], j->parts[j->n - 1], j->dim);
}

static struct ggml_tensor *join_finish(struct ggml_context *ctx, pie_joiner *j) {
    for (; j->n > 1; j->n--) j->parts[j->n - 2] = ggml_concat(ctx, j->parts[j->n - 2], j->parts[j->n - 1], j->dim);
    return j->parts[0];
}

/*
 * From how many columns ggml's CPU backend multiplies a weight of this type with a kernel other
 * than vec_dot (1: never, or with the very same sums). Read from ggml-cpu's mul_mat:
 *   k-quants and most i-quants: the tiled kernels (ggml-cpu/tiled, x86) from 8 columns;
 *   f32, f16, bf16, iq4_nl: llamafile's sgemm from 2 columns (ARM: f32 from 4, f16 from 8);
 *   q8_0, q4_0, q5_0: sgemm from 2 columns too, but on x86 it adds the same integer lanes with the
 *     same float operations in the same order as vec_dot does (tinyBLAS_Q0_AVX against the
 *     AVX2 vec_dot kernels): the same values either way;
 *   every other type: vec_dot at any count.
 * A repacked weight (in the CPU_REPACK buffer, see place_repacked in loader.c) takes the repack
 * kernels instead: a product quantizes its columns and multiplies them with gemm in whole groups
 * of 4 from its first column, the rest one by one with gemv. On x86 the types whose columns are
 * quantized to q8_0 (q4_0, iq4_nl, mxfp4) get the same values from both (1); the ones quantized
 * to q8_K (q4_K, q2_K) do not, so their switch is 4. Elsewhere 4 for all (not measured there).
 * tests/test_driver_invariance.py checks each type it can write for exact batch invariance.
 */
int32_t pie_kernel_switch(enum ggml_type type, bool repacked) {
    if (repacked) {
#if defined(__x86_64__) || defined(_M_X64)
        if (type == GGML_TYPE_Q4_0 || type == GGML_TYPE_IQ4_NL || type == GGML_TYPE_MXFP4) return 1;
#endif
        return 4;
    }
    switch (type) {
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ4_XS: case GGML_TYPE_IQ2_XXS: case GGML_TYPE_IQ2_XS: case GGML_TYPE_IQ2_S:
        case GGML_TYPE_IQ3_XXS: case GGML_TYPE_IQ3_S: case GGML_TYPE_IQ1_S: case GGML_TYPE_IQ1_M:
            return 8;
#if defined(__x86_64__) || defined(_M_X64)
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_IQ4_NL:
            return 2;
#else
        case GGML_TYPE_F32: return 4;
        case GGML_TYPE_F16: return 8;
        case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_0: case GGML_TYPE_Q5_0: case GGML_TYPE_IQ4_NL:
            return 2;
#endif
        default:
            return 1;
    }
}

/*
 * w x for x: [ne0, n], the rows of g->layout, such that every column takes the kernel its own
 * request picks (see PIE_WIDE_ROWS), whatever else is in the batch:
 *   a type that never switches kernels: one product;
 *   a type that switches at 2 columns: one product, a lone column paired with a zero column
 *     (so every column takes the many-column kernel: cheap, a product is rarely one column);
 *   a type that switches later (k-quants, repacked q4_K): each wide span (one request's rows) as
 *     a product of its own (>= PIE_WIDE_ROWS columns: the same product as when the request is
 *     alone), narrow spans in products of fewer columns than the switch (vec_dot, gemv), joined.
 */
struct ggml_tensor *pie_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x) {
    struct ggml_context *ctx = g->ctx;
    const bool repacked = w->buffer && w->buffer == g->model->buf_repack;
    const int64_t k = pie_kernel_switch(w->type, repacked), n = x->ne[1];
    const pie_layout *l = g->layout;
    if (k == 1 || (k == 2 && n >= 2) || (k > 2 && l->n_spans == 1 && (l->spans[0].wide || n < k)))
        return ggml_mul_mat(ctx, w, x);
    if (k == 2) {
        if (!g->zeros) g->zeros = input(g, GGML_TYPE_F32, g->model->pad_width, "zeros");
        struct ggml_tensor *zero = ggml_view_2d(ctx, g->zeros, x->ne[0], 1, x->nb[1], 0);
        struct ggml_tensor *y = ggml_mul_mat(ctx, w, ggml_concat(ctx, x, zero, 1));
        return ggml_view_2d(ctx, y, y->ne[0], 1, y->nb[1], 0);
    }
    pie_joiner j = { .dim = 1 };
    for (int32_t i = 0; i < l->n_spans; i++) {
        const pie_span *s = &l->spans[i];
        const int64_t step = s->wide ? s->len : k - 1;
        for (int64_t c = s->start; c < s->start + s->len; c += step) {
            const int64_t cols = s->start + s->len - c < step ? s->start + s->len - c : step;
            join_push(ctx, &j, ggml_mul_mat(ctx, w, ggml_view_2d(ctx, x, x->ne[0], cols, x->nb[1], x->nb[1] * (size_t)c)));
        }
    }
    return join_finish(ctx, &j);
}

struct ggml_tensor *pie_linear(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *b, struct ggml_tensor *x) {
    x = pie_matmul(g, w, x);
    return b ? ggml_add(g->ctx, x, b) : x;
}

/* x: [head_dim, n_heads, n_tokens], rotated at the batch's explicit positions, scaled as the
 * file says (linear or YaRN, see load_rope_scaling in loader.c). Sliding-window layers use their
 * own base and no scaling factor (as llama.cpp does); YaRN's beta_fast 32 and beta_slow 1 are
 * llama.cpp's. */
struct ggml_tensor *pie_rope(pie_graph *g, struct ggml_tensor *x, int il) {
    const pie_hparams *hp = &g->model->hp;
    const bool swa = hp->is_swa[il];
    return ggml_rope_ext(g->ctx, x, g->positions, g->model->w.rope_freqs, hp->n_rot, hp->rope_mode, hp->rope_n_ctx_orig,
                         swa ? hp->rope_base_swa : hp->rope_base, swa ? 1.0f : hp->rope_scale, hp->rope_ext_factor,
                         hp->rope_attn_factor, 32.0f, 1.0f);
}

/* Request r's K or V as [width_head, n_kv, n_head_kv], on the pool's own f16/q8_0 values
 * whichever way it is read, so attention runs the same kernels on the same values and page
 * placement never changes a result:
 *   one run of consecutive pages: a view of the pool (no copy);
 *   a few runs: copied into one contiguous tensor (row memcpy, any pool type);
 *   otherwise: rows gathered (get_rows yields F32) and cast back to the pool's type (lossless). */
static struct ggml_tensor *request_kv(pie_graph *g, struct ggml_tensor *pool, const pie_plan_req *q, int64_t head) {
    struct ggml_context *ctx = g->ctx;
    const int64_t hkv = g->model->hp.n_head_kv;
    const pie_kv_run *run = g->plan->runs + q->run_off;
    if (q->n_runs == 1)
        return ggml_view_3d(ctx, pool, head, q->n_kv, hkv, pool->nb[1], ggml_row_size(pool->type, head),
                            pool->nb[1] * (size_t)run->start);
    struct ggml_tensor *kv; /* [head * hkv, n_kv] */
    if (q->n_runs > 1) {
        /* The destination starts as a copy of the n_kv pool rows from run 0 on (run 0 is then in
         * place), the later runs are copied over its tail. ggml's f16 concat goes element by
         * element (3x slower for a forked stream's decode step); these copies are row memcpys.
         * Each copy is put in the graph now, so it runs before the attention that reads kv. */
        const size_t row = pool->nb[1];
        int64_t base = run[0].start, at = run[0].len;
        int32_t first = 1;
        if (base + q->n_kv > pool->ne[1]) base = 0, at = 0, first = 0; /* the window would pass the pool's end */
        kv = ggml_cont(ctx, ggml_view_2d(ctx, pool, pool->ne[0], q->n_kv, row, row * (size_t)base));
        for (int32_t i = first; i < q->n_runs; i++) {
            struct ggml_tensor *src = ggml_view_2d(ctx, pool, pool->ne[0], run[i].len, row, row * (size_t)run[i].start);
            struct ggml_tensor *dst = ggml_view_2d(ctx, kv, kv->ne[0], run[i].len, kv->nb[1], kv->nb[1] * (size_t)at);
            ggml_build_forward_expand(g->gf, ggml_cpy(ctx, src, dst));
            at += run[i].len;
        }
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

    pie_joiner joined = { .dim = 2 }; /* per-request results [head_dim_v, n_head, n_q] */
    for (int32_t r = 0; r < p->n_requests; r++) {
        const pie_plan_req *rq = &p->reqs[r];
        struct ggml_tensor *qr = ggml_view_3d(ctx, q, hp->head_dim, hp->n_head, rq->n_q, q->nb[1], q->nb[2], q->nb[2] * (size_t)rq->q0);
        qr = ggml_permute(ctx, qr, 0, 2, 1, 3); /* [head_dim, n_q, n_head] */
        struct ggml_tensor *mr = ggml_view_2d(ctx, mask, rq->n_kv, rq->n_q, sizeof(ggml_fp16_t) * (size_t)rq->n_kv,
                                              sizeof(ggml_fp16_t) * (size_t)rq->mask_off); /* [n_kv, n_q] */
        struct ggml_tensor *out = ggml_flash_attn_ext(ctx, qr, request_kv(g, kp, rq, hp->head_dim),
                                                      request_kv(g, vp, rq, hp->head_dim_v), mr, kq_scale, 0.0f, 0.0f);
        ggml_prec_set_acc(out, GGML_PREC_F32); /* out: [head_dim_v, n_head, n_q] */
        join_push(ctx, &joined, out);
    }
    return ggml_reshape_2d(ctx, join_finish(ctx, &joined), hp->head_dim_v * hp->n_head, nt);
}

/* Keeps only the rows the batch samples: [n, n_tokens] -> [n, n_outputs]; products from
 * here on multiply the sampled rows. */
struct ggml_tensor *pie_select_outputs(pie_graph *g, struct ggml_tensor *x) {
    g->layout = &g->plan->output_layout;
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
    struct ggml_tensor *logits = pie_matmul(g, m->w.output, g->hidden);
    const float cap = m->hp.logit_softcap;
    if (cap > 0.0f) logits = ggml_scale(g->ctx, ggml_tanh(g->ctx, ggml_scale(g->ctx, logits, 1.0f / cap)), cap);
    g->logits = pie_name(logits, "result_output", -1);
    ggml_set_output(g->logits);
    ggml_build_forward_expand(g->gf, g->logits);
}
