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
    g->attn_temp   = NULL; /* created by the first layer that needs it */
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

/* Token embeddings, scaled: [n_embd, n_tokens]. The scaled tensor is "embd" where llama.cpp
 * scales inside its input embedding (Granite), "inp_scaled" where it scales after (Gemma). */
struct ggml_tensor *pie_embed(pie_graph *g) {
    const pie_hparams *hp = &g->model->hp;
    struct ggml_tensor *x = ggml_get_rows(g->ctx, g->model->w.tok_embd, g->tokens);
    if (hp->embd_scale == 1.0f) return pie_name(x, "embd", -1);
    if (hp->embd_scale_input) return pie_name(ggml_scale(g->ctx, x, hp->embd_scale), "embd", -1);
    x = pie_name(x, "embd", -1);
    return pie_name(ggml_scale(g->ctx, x, hp->embd_scale), "inp_scaled", -1);
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
    struct ggml_tensor *q8 = pie_q8_matmul(g, w, x); /* invariant by construction */
    if (q8) return q8;
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

/*
 * The expert products (mul_mat_id) pick their kernel per expert, by how many rows of the whole
 * product that expert receives: ggml-cpu's tiled kernel (k-quants and most i-quants, x86) from 8
 * rows, vec_dot below; every other type always takes vec_dot (mul_mat_id has no sgemm path).
 * Returns that switch (1: never switches).
 */
int32_t pie_kernel_switch_id(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ4_XS: case GGML_TYPE_IQ2_XXS: case GGML_TYPE_IQ2_XS: case GGML_TYPE_IQ2_S:
        case GGML_TYPE_IQ3_XXS: case GGML_TYPE_IQ3_S: case GGML_TYPE_IQ1_S: case GGML_TYPE_IQ1_M:
            return 8;
        default:
            return 1;
    }
}

/* The request a row of g->layout belongs to. */
static int32_t row_request(const pie_graph *g, int64_t row) {
    const pie_plan *p = g->plan;
    if (g->layout == &p->output_layout) return p->n_outputs > 0 && p->out_req ? p->out_req[row] : 0;
    int32_t lo = 0, hi = p->n_requests - 1;
    while (lo < hi) {
        const int32_t mid = (lo + hi + 1) / 2;
        if (p->reqs[mid].q0 <= row) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/*
 * Expert products w[ids] x, batch-invariant like pie_matmul:
 *   w:   [ne0, n_out, n_expert]    x: [ne0, n_x, n]  (n_x 1: every expert reads the same row)
 *   ids: [n_used, n] I32           ->   [n_out, n_used, n]
 * An expert's kernel depends on how many rows of the product it gets (pie_kernel_switch_id), so
 * with a type that switches, the rows of a wide request go through products of their own (what
 * an expert gets then depends on that request alone) and narrow spans through products of fewer
 * rows than the switch (vec_dot for every expert). Other types: one product.
 */
struct ggml_tensor *pie_matmul_id(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x, struct ggml_tensor *ids) {
    struct ggml_context *ctx = g->ctx;
    const pie_layout *l = g->layout;
    if (pie_kernel_switch_id(w->type) == 1 || (l->n_spans == 1 && !l->spans[0].wide && x->ne[2] <= g->model->split_cols))
        return ggml_mul_mat_id(ctx, w, x, ids);
    pie_joiner j = { .dim = 2 };
    for (int32_t i = 0; i < l->n_spans; i++) {
        const pie_span *s = &l->spans[i];
        const int64_t end = s->start + s->len;
        for (int64_t c = s->start, next; c < end; c = next) {
            if (s->wide) { /* up to the next request */
                const int32_t r = row_request(g, c);
                for (next = c + 1; next < end && row_request(g, next) == r; next++) {}
            } else {
                next = c + g->model->split_cols < end ? c + g->model->split_cols : end;
            }
            const int64_t cols = next - c;
            struct ggml_tensor *xs = ggml_view_3d(ctx, x, x->ne[0], x->ne[1], cols, x->nb[1], x->nb[2], x->nb[2] * (size_t)c);
            struct ggml_tensor *is = ggml_view_2d(ctx, ids, ids->ne[0], cols, ids->nb[1], ids->nb[1] * (size_t)c);
            join_push(ctx, &j, ggml_mul_mat_id(ctx, w, xs, is));
        }
    }
    return join_finish(ctx, &j);
}

/* gelu(gate x) * up x: [n_ff, n]. One op where the driver's own kernels take both matrices
 * (matmul_q8.c), ggml's two products and its GEGLU otherwise; the same values either way, up to
 * the order of the products' float sums. */
struct ggml_tensor *pie_geglu(pie_graph *g, struct ggml_tensor *gate, struct ggml_tensor *up, struct ggml_tensor *x) {
    struct ggml_tensor *fused = pie_q8_geglu(g, gate, up, x);
    return fused ? fused : ggml_geglu_split(g->ctx, pie_matmul(g, gate, x), pie_matmul(g, up, x));
}

struct ggml_tensor *pie_linear(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *b, struct ggml_tensor *x) {
    x = pie_matmul(g, w, x);
    return b ? ggml_add(g->ctx, x, b) : x;
}

/* x: [head_dim, n_heads, n_tokens], rotated at the batch's explicit positions, scaled as the
 * file says (linear or YaRN, see load_rope_scaling in loader.c). Sliding-window layers use their
 * own base and scaling factor (unscaled unless the family says otherwise, as llama.cpp does), and
 * the extension and attention factors their family gives them. Layers without RoPE (hp->no_rope)
 * return x as it is. */
struct ggml_tensor *pie_rope(pie_graph *g, struct ggml_tensor *x, int il) {
    const pie_hparams *hp = &g->model->hp;
    if (hp->no_rope[il]) return x;
    const bool swa = hp->is_swa[il];
    return ggml_rope_ext(g->ctx, x, g->positions, g->model->w.rope_freqs, hp->n_rot, hp->rope_mode, hp->rope_n_ctx_orig,
                         swa ? hp->rope_base_swa : hp->rope_base, swa ? hp->rope_scale_swa : hp->rope_scale,
                         swa ? hp->rope_ext_factor_swa : hp->rope_ext_factor,
                         swa ? hp->rope_attn_factor_swa : hp->rope_attn_factor, hp->rope_beta_fast, hp->rope_beta_slow);
}

/* Q, K and V of x [n_embd, n_tokens] as [head_dim, n_head(_kv), n_tokens], from separate
 * projections or one fused Q|K|V projection (then Q, K and V are views of its rows, and the
 * biases are its own or the three separate ones, as llama.cpp's build_qkv takes them). */
void pie_qkv(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, struct ggml_tensor **q,
             struct ggml_tensor **k, struct ggml_tensor **v) {
    struct ggml_context *ctx = g->ctx;
    const pie_hparams *hp = &g->model->hp;
    const int64_t nt = x->ne[1], hd = hp->head_dim, hv = hp->head_dim_v;
    if (!L->wqkv) {
        *q = ggml_reshape_3d(ctx, pie_linear(g, L->wq, L->bq, x), hd, hp->n_head, nt);
        *k = ggml_reshape_3d(ctx, pie_linear(g, L->wk, L->bk, x), hd, hp->n_head_kv, nt);
        *v = ggml_reshape_3d(ctx, pie_linear(g, L->wv, L->bv, x), hv, hp->n_head_kv, nt);
        return;
    }
    struct ggml_tensor *qkv = pie_linear(g, L->wqkv, L->bqkv, x); /* [Q + K + V, n_tokens] */
    if (!L->bqkv && L->bq) qkv = ggml_add(ctx, qkv, ggml_concat(ctx, ggml_concat(ctx, L->bq, L->bk, 0), L->bv, 0));
    const size_t es = ggml_element_size(qkv), nq = (size_t)(hd * hp->n_head), nk = (size_t)(hd * hp->n_head_kv);
    *q = ggml_view_3d(ctx, qkv, hd, hp->n_head, nt, es * (size_t)hd, qkv->nb[1], 0);
    *k = ggml_view_3d(ctx, qkv, hd, hp->n_head_kv, nt, es * (size_t)hd, qkv->nb[1], es * nq);
    *v = ggml_view_3d(ctx, qkv, hv, hp->n_head_kv, nt, es * (size_t)hv, qkv->nb[1], es * (nq + nk));
}

/* SwiGLU feed-forward of x [n_embd, n] -> [n_embd, n]: separate gate and up projections, or one
 * fused projection whose first half is the gate (Phi-3); biases where the file has them. */
struct ggml_tensor *pie_ffn_swiglu(pie_graph *g, const pie_layer *L, struct ggml_tensor *x) {
    struct ggml_tensor *cur;
    if (L->ffn_gate)
        cur = ggml_swiglu_split(g->ctx, pie_linear(g, L->ffn_gate, L->ffn_gate_b, x), pie_linear(g, L->ffn_up, L->ffn_up_b, x));
    else
        cur = ggml_swiglu(g->ctx, pie_linear(g, L->ffn_up, L->ffn_up_b, x)); /* [2 n_ff, n] -> [n_ff, n] */
    return pie_linear(g, L->ffn_down, L->ffn_down_b, cur);
}

/* The per-token Q scale of attention temperature (hp->attn_temp_scale): F32 [1, 1, n_tokens],
 * broadcast over a Q of [head_dim, n_head, n_tokens]; batch.c computes its values. */
struct ggml_tensor *pie_attn_temperature(pie_graph *g) {
    if (!g->attn_temp) {
        g->attn_temp = ggml_new_tensor_3d(g->ctx, GGML_TYPE_F32, 1, 1, g->n_tokens);
        pie_name(g->attn_temp, "inp_attn_scale", -1);
        ggml_set_input(g->attn_temp);
    }
    return g->attn_temp;
}

/* Group gr's K or V as [width_head, n_kv, n_head_kv], on the pool's own f16/q8_0 values
 * whichever way it is read, so attention runs the same kernels on the same values and page
 * placement never changes a result:
 *   one run of consecutive pages: a view of the pool (no copy);
 *   more runs: copied into one contiguous tensor (row memcpy, any pool type);
 *   otherwise: rows gathered (get_rows yields F32) and cast back to the pool's type (lossless). */
static struct ggml_tensor *group_kv(pie_graph *g, struct ggml_tensor *pool, const pie_plan_group *gr, int64_t head) {
    struct ggml_context *ctx = g->ctx;
    const int64_t hkv = g->model->hp.n_head_kv;
    const pie_kv_run *run = g->plan->runs + gr->run_off;
    if (gr->n_runs == 1)
        return ggml_view_3d(ctx, pool, head, gr->n_kv, hkv, pool->nb[1], ggml_row_size(pool->type, head),
                            pool->nb[1] * (size_t)run->start);
    struct ggml_tensor *kv; /* [head * hkv, n_kv] */
    if (gr->n_runs > 1) {
        /* The destination starts as a copy of the n_kv pool rows from run 0 on (run 0 is then in
         * place), the later runs are copied over its tail. ggml's f16 concat goes element by
         * element (3x slower for a forked stream's decode step); these copies are row memcpys.
         * Each copy is put in the graph now, so it runs before the attention that reads kv. */
        const size_t row = pool->nb[1];
        int64_t base = run[0].start, at = run[0].len;
        int32_t first = 1;
        if (base + gr->n_kv > pool->ne[1]) base = 0, at = 0, first = 0; /* the window would pass the pool's end */
        kv = ggml_cont(ctx, ggml_view_2d(ctx, pool, pool->ne[0], gr->n_kv, row, row * (size_t)base));
        for (int32_t i = first; i < gr->n_runs; i++) {
            struct ggml_tensor *src = ggml_view_2d(ctx, pool, pool->ne[0], run[i].len, row, row * (size_t)run[i].start);
            struct ggml_tensor *dst = ggml_view_2d(ctx, kv, kv->ne[0], run[i].len, kv->nb[1], kv->nb[1] * (size_t)at);
            ggml_build_forward_expand(g->gf, ggml_cpy(ctx, src, dst));
            at += run[i].len;
        }
    } else {
        struct ggml_tensor *rows = ggml_view_1d(ctx, g->gather_rows, gr->n_kv, sizeof(int32_t) * (size_t)gr->gather_off);
        kv = ggml_cast(ctx, ggml_get_rows(ctx, pool, rows), pool->type);
    }
    return ggml_permute(ctx, ggml_reshape_3d(ctx, kv, head, hkv, gr->n_kv), 0, 2, 1, 3);
}

/*
 * Paged attention of layer il.
 *   q: [head_dim,   n_head,    n_tokens]   (roped)
 *   k: [head_dim,   n_head_kv, n_tokens]   (roped)
 *   v: [head_dim_v, n_head_kv, n_tokens]
 * The new K/V rows of every request go into the pool at write_rows in one op; then each attention
 * group (a request, or requests sharing their first pages: pie_plan_group) attends over its KV
 * under its mask block (causal, custom BRLE, sliding window, the other members' rows), and the
 * results are concatenated back in batch order. kq_scale multiplies Q.K; a
 * family's attention softcap (gemma2) caps the scaled Q.K inside the same fused kernel
 * (ggml_flash_attn_ext's logit_softcap: cap * tanh(x / cap) before the softmax), so the other
 * families, with a cap of 0, run exactly the kernel they ran before.
 * A layer that shares an earlier layer's KV (hp->kv_layer, gemma3n) passes k and v NULL: it
 * writes nothing and reads that layer's pool as written in this pass.
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
    struct ggml_tensor *kp, *vp;
    if (k) {
        /* K and V may be views of a fused projection (a layer without RoPE keeps K as one) */
        if (!ggml_is_contiguous(k)) k = ggml_cont(ctx, k);
        if (!ggml_is_contiguous(v)) v = ggml_cont(ctx, v);
        kp = ggml_set_rows(ctx, m->kv.k[il], ggml_reshape_2d(ctx, k, hp->head_dim * hkv, nt), g->write_rows);
        vp = ggml_set_rows(ctx, m->kv.v[il], ggml_reshape_2d(ctx, v, hp->head_dim_v * hkv, nt), g->write_rows);
        g->kv_k[il] = kp;
        g->kv_v[il] = vp;
    } else {
        kp = g->kv_k[hp->kv_layer[il]];
        vp = g->kv_v[hp->kv_layer[il]];
    }
    struct ggml_tensor *own = pie_attn_cpu(g, il, q, kp, vp, kq_scale); /* [head_dim_v, n_head, nt] */
    if (own) return ggml_reshape_2d(ctx, own, hp->head_dim_v * hp->n_head, nt);
    struct ggml_tensor *mask = hp->is_swa[il] && g->mask_swa ? g->mask_swa : g->mask;

    /* the dummy row of a padded query steers ggml's CPU kernel (PIE_SPLIT_KV_ROWS); other devices
     * run the query alone */
    const bool on_cpu = m->place.layer_dev[il] == m->place.n_dev - 1;
    pie_joiner joined = { .dim = 2 }; /* per-group results [head_dim_v, n_head, n_q] */
    for (int32_t i = 0; i < p->n_groups; i++) {
        const pie_plan_group *gr = &p->groups[i];
        const bool pad = gr->pad && on_cpu;
        const int64_t rows = gr->n_q + pad;
        struct ggml_tensor *qr = ggml_view_3d(ctx, q, hp->head_dim, hp->n_head, gr->n_q, q->nb[1], q->nb[2],
                                              q->nb[2] * (size_t)gr->q0);
        qr = ggml_permute(ctx, qr, 0, 2, 1, 3); /* [head_dim, n_q, n_head] */
        if (pad) qr = ggml_repeat_4d(ctx, qr, qr->ne[0], 2, qr->ne[2], 1); /* the lone query twice */
        struct ggml_tensor *mr = ggml_view_2d(ctx, mask, gr->n_kv, rows, sizeof(ggml_fp16_t) * (size_t)gr->n_kv,
                                              sizeof(ggml_fp16_t) * (size_t)gr->mask_off); /* [n_kv, rows] */
        struct ggml_tensor *out = ggml_flash_attn_ext(ctx, qr, group_kv(g, kp, gr, hp->head_dim),
                                                      group_kv(g, vp, gr, hp->head_dim_v), mr, kq_scale, 0.0f,
                                                      hp->attn_softcap);
        if (m->w.layers[il].attn_sinks) ggml_flash_attn_ext_add_sinks(out, m->w.layers[il].attn_sinks); /* gpt-oss */
        ggml_prec_set_acc(out, GGML_PREC_F32); /* out: [head_dim_v, n_head, rows] */
        if (pad) out = ggml_view_3d(ctx, out, out->ne[0], out->ne[1], 1, out->nb[1], out->nb[2], 0);
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

/* x: [n_embd, n_outputs] -> hidden (after the output norm, and an embedding model's dense
 * projections: they are linear, so projecting each row then pooling equals llama.cpp's pooling
 * then projecting) and logits [n_vocab, n_outputs], divided by the logit scale (Granite), then
 * soft-capped (Gemma). A batch that samples nothing (a prefill chunk) stops at the hidden state: the LM head is the
 * largest matrix of a small model. */
void pie_graph_finish(pie_graph *g, struct ggml_tensor *x) {
    const pie_model *m = g->model;
    g->hidden = pie_name(pie_norm(g, x, m->w.output_norm), "result_norm", -1);
    if (m->w.dense_2) { /* an embedding model's projections, per row: [n_embd] -> [d] -> [n_embd] */
        struct ggml_tensor *d = pie_matmul(g, m->w.dense_2, g->hidden); /* [d, n_outputs] */
        g->hidden = pie_name(pie_matmul(g, m->w.dense_3, d), "result_embd_pooled", -1);
    }
    ggml_set_output(g->hidden);
    ggml_build_forward_expand(g->gf, g->hidden);
    if (!g->plan->head || !m->w.output) return; /* an embedding model has no head */
    struct ggml_tensor *logits = pie_matmul(g, m->w.output, g->hidden);
    if (m->hp.logit_scale != 1.0f) logits = ggml_scale(g->ctx, logits, 1.0f / m->hp.logit_scale);
    const float cap = m->hp.logit_softcap;
    if (cap > 0.0f) logits = ggml_scale(g->ctx, ggml_tanh(g->ctx, ggml_scale(g->ctx, logits, 1.0f / cap)), cap);
    g->logits = pie_name(logits, "result_output", -1);
    ggml_set_output(g->logits);
    ggml_build_forward_expand(g->gf, g->logits);
}
