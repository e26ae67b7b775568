/*
 * attention_cpu.c — paged attention on x86 CPUs with AVX-512, reading the KV pool in place.
 *
 * Why: ggml's flash attention takes one contiguous K and V per call, so an attention group
 * (forks, or clients of one cached system prompt: pie_plan_group) first copied its runs of pages
 * into one tensor every layer, and then each query walked every row one at a time (a scalar
 * expf per row, V summed into an f16 accumulator). 8 forks of a 512-token prompt spent a third
 * of a decode step there.
 *
 * How: one op per layer for the whole batch. Its work items are (group, query head, up to
 * QUERIES of the group's queries); each reads the K and V rows through the pool row of every
 * KV position (no copy), converts a K row to float once for all the item's queries, and keeps
 * every query's scores. Per query, the rows its mask shows (in the group's order: the shared
 * rows, then its own) are compacted into a list; the softmax takes their maximum, exponentials
 * (16 at a time) and their sum over that list, and V is summed in float over the same list.
 *
 * The values: Q is rounded to fp16 as ggml does before its f16 dot; scores, softmax and the V
 * sum are in float32 (ggml sums V in fp16), two passes instead of an online rescaling. Everything
 * a query computes depends only on its own list, and a query alone has the same list as in any
 * group and on any pages: results never depend on the batch (test_driver_fork_groups).
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PIE_ATTN_CPU 1
#include <immintrin.h>
#endif

enum {
    QUERIES = 32,   /* queries of one group per work item (a group has at most PIE_GROUP_ROWS) */
    MAX_DIM = 512,  /* widest head taken                                                      */
    V_REGS = 16,    /* float registers of V sums at a time: 256 values                        */
};

/* One thread's scratch, for groups of up to max_batch_kv positions. */
typedef struct {
    int32_t *rows;    /* [n_kv] pool row of each KV position of the group                      */
    int32_t *list;    /* [n_kv + 16] the positions one query sees                              */
    float   *scores;  /* [QUERIES * n_kv]                                                      */
    float   *weights; /* [n_kv + 16] one query's softmax weights over its list                 */
    float   *queries; /* [QUERIES * MAX_DIM] the item's queries, rounded to fp16               */
    float   *krow;    /* [MAX_DIM] one K row in float                                          */
} scratch;

/* What a layer's op reads besides its tensors (userdata of the op; set at graph build). */
typedef struct {
    const pie_model *m;
    int32_t il;
    float   scale;
} layer_call;

struct pie_attn_store {
    int32_t    n_slots;                 /* the most threads a pass runs                      */
    scratch   *slots;
    layer_call calls[PIE_MAX_LAYERS];
};

bool pie_attn_cpu_supported(void) {
#ifdef PIE_ATTN_CPU
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

/* Scratch for n_threads threads and groups of up to max_kv positions (committed as touched). */
int32_t pie_attn_cpu_open(pie_model *m, int32_t n_threads, int64_t max_kv) {
    pie_attn_store *st = m->attn_cpu = calloc(1, sizeof(*m->attn_cpu));
    bool ok = st && (st->slots = calloc((size_t)n_threads, sizeof(scratch)));
    if (ok) st->n_slots = n_threads;
    for (int32_t i = 0; ok && i < n_threads; i++) {
        scratch *s = &st->slots[i];
        s->rows = malloc((size_t)max_kv * sizeof(int32_t));
        s->list = malloc(((size_t)max_kv + 16) * sizeof(int32_t));
        s->scores = malloc(QUERIES * (size_t)max_kv * sizeof(float));
        s->weights = malloc(((size_t)max_kv + 16) * sizeof(float));
        s->queries = aligned_alloc(64, QUERIES * MAX_DIM * sizeof(float));
        s->krow = aligned_alloc(64, MAX_DIM * sizeof(float));
        ok = s->rows && s->list && s->scores && s->weights && s->queries && s->krow;
    }
    if (!ok) {
        pie_attn_cpu_free(m);
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate the attention kernel's scratch");
    }
    pie_log(PIE_LOG_INFO, "attention: the driver's AVX-512 kernel, reading the KV pool in place (attention_cpu.c)");
    return PIE_OK;
}

void pie_attn_cpu_free(pie_model *m) {
    if (!m->attn_cpu) return;
    for (int32_t i = 0; m->attn_cpu->slots && i < m->attn_cpu->n_slots; i++) {
        scratch *s = &m->attn_cpu->slots[i];
        free(s->rows); free(s->list); free(s->scores); free(s->weights); free(s->queries); free(s->krow);
    }
    free(m->attn_cpu->slots);
    free(m->attn_cpu);
    m->attn_cpu = NULL;
}

#ifdef PIE_ATTN_CPU

#define ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

/* A position the mask hides. */
static inline bool hidden(float mask_value) { return mask_value == -INFINITY; }

/* e^x for x <= 0, 16 at a time: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' expf polynomial,
 * then scaled by 2^n (scalef gives 0 for very negative x). About 1 ulp. */
ATTN_TARGET static inline __m512 exp_neg(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* q . k over hd values (a multiple of 16): four sums of 16 lanes, added pairwise, then across the
 * lanes; the same instructions for every query and row. */
ATTN_TARGET static inline float dot(const float *q, const float *k, int64_t hd) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t d = 0;
    for (; d + 64 <= hd; d += 64) {
        a0 = _mm512_fmadd_ps(_mm512_load_ps(q + d), _mm512_load_ps(k + d), a0);
        a1 = _mm512_fmadd_ps(_mm512_load_ps(q + d + 16), _mm512_load_ps(k + d + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_load_ps(q + d + 32), _mm512_load_ps(k + d + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_load_ps(q + d + 48), _mm512_load_ps(k + d + 48), a3);
    }
    if (d < hd) a0 = _mm512_fmadd_ps(_mm512_load_ps(q + d), _mm512_load_ps(k + d), a0), d += 16;
    if (d < hd) a1 = _mm512_fmadd_ps(_mm512_load_ps(q + d), _mm512_load_ps(k + d), a1), d += 16;
    if (d < hd) a2 = _mm512_fmadd_ps(_mm512_load_ps(q + d), _mm512_load_ps(k + d), a2);
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* out[0 .. 16R) = inv * sum over the list of weight x V row (values 16R wide from v0), in list
 * order; R registers of sums (a constant, so they stay in registers). */
ATTN_TARGET static inline __attribute__((always_inline)) void
sum_v_regs(float *out, const char *v0, size_t row_bytes, const int32_t *rows, const int32_t *list, const float *weights,
           int32_t n, int R, float inv) {
    __m512 acc[V_REGS];
    for (int k = 0; k < R; k++) acc[k] = _mm512_setzero_ps();
    for (int32_t i = 0; i < n; i++) {
        const ggml_fp16_t *v = (const ggml_fp16_t *)(v0 + (size_t)rows[list[i]] * row_bytes);
        const __m512 wt = _mm512_set1_ps(weights[i]);
        for (int k = 0; k < R; k++) acc[k] = _mm512_fmadd_ps(wt, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 16 * k))), acc[k]);
    }
    for (int k = 0; k < R; k++) _mm512_storeu_ps(out + 16 * k, _mm512_mul_ps(acc[k], _mm512_set1_ps(inv)));
}

ATTN_TARGET static void sum_v(float *out, const char *v0, size_t row_bytes, const int32_t *rows, const int32_t *list,
                              const float *weights, int32_t n, int R, float inv) {
#define REGS(r) case r: sum_v_regs(out, v0, row_bytes, rows, list, weights, n, r, inv); return;
    switch (R) { REGS(1) REGS(2) REGS(3) REGS(4) REGS(5) REGS(6) REGS(7) REGS(8)
                 REGS(9) REGS(10) REGS(11) REGS(12) REGS(13) REGS(14) REGS(15) REGS(16) }
#undef REGS
}

/* The pool rows of a group's KV positions, in the group's order. */
static void group_rows(const pie_plan *p, const pie_plan_group *gr, int32_t *rows) {
    if (gr->n_runs == 0) {
        memcpy(rows, p->gather_rows + gr->gather_off, sizeof(int32_t) * (size_t)gr->n_kv);
        return;
    }
    int32_t at = 0;
    for (int32_t i = 0; i < gr->n_runs; i++) {
        const pie_kv_run *run = &p->runs[gr->run_off + i];
        for (int32_t j = 0; j < run->len; j++) rows[at++] = run->start + j;
    }
}

/*
 * One work item: queries j0 .. j0 + nq of group gr, query head h.
 *   q:  F32 [head_dim, n_head, n_tokens]   kp: F16 [head_dim * n_head_kv, pool rows]
 *   vp: F16 [head_dim_v * n_head_kv, pool rows]   dst: F32 [head_dim_v, n_head, n_tokens]
 */
ATTN_TARGET static void attend(const layer_call *call, const pie_plan_group *gr, int32_t h, int32_t j0, int32_t nq,
                               const struct ggml_tensor *q, const struct ggml_tensor *kp, const struct ggml_tensor *vp,
                               struct ggml_tensor *dst, scratch *s) {
    const pie_model *m = call->m;
    const pie_hparams *hp = &m->hp;
    const pie_plan *p = &m->plan;
    const int64_t hd = hp->head_dim, hdv = hp->head_dim_v, n_kv = gr->n_kv;
    const int32_t kvh = h / (hp->n_head / hp->n_head_kv);
    const ggml_fp16_t *mask = (hp->is_swa[call->il] && p->any_swa_mask ? p->mask_swa : p->mask) + gr->mask_off;
    group_rows(p, gr, s->rows);

    /* the queries, rounded to fp16 as ggml's f16 dot takes them */
    for (int32_t j = 0; j < nq; j++) {
        const float *src = (const float *)((const char *)q->data + h * q->nb[1] + (gr->q0 + j0 + j) * q->nb[2]);
        for (int64_t d = 0; d < hd; d += 16)
            _mm512_store_ps(s->queries + j * MAX_DIM + d,
                            _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT)));
    }

    /* scores: each K row converted once, dotted with every query that sees it */
    float *krow = s->krow;
    for (int64_t r = 0; r < n_kv; r++) {
        bool any = false;
        for (int32_t j = 0; j < nq && !any; j++) any = !hidden(_cvtsh_ss(mask[(j0 + j) * n_kv + r]));
        if (!any) continue;
        const ggml_fp16_t *k = (const ggml_fp16_t *)((const char *)kp->data + s->rows[r] * kp->nb[1]) + kvh * hd;
        for (int64_t d = 0; d < hd; d += 16) _mm512_store_ps(krow + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + d))));
        for (int32_t j = 0; j < nq; j++) {
            const float mv = _cvtsh_ss(mask[(j0 + j) * n_kv + r]);
            if (hidden(mv)) continue;
            s->scores[j * n_kv + r] = dot(s->queries + j * MAX_DIM, krow, hd) * call->scale + mv;
        }
    }

    /* per query: its list, softmax over it, V summed over it */
    for (int32_t j = 0; j < nq; j++) {
        const ggml_fp16_t *mrow = mask + (j0 + j) * n_kv;
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const float *sc = s->scores + j * n_kv;
        int32_t n = 0;
        __m512 tops = _mm512_set1_ps(-INFINITY);
        for (int64_t r = 0; r < n_kv; r += 16) {
            const __mmask16 in = r + 16 <= n_kv ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_kv - r)) - 1);
            const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, mrow + r));
            const __mmask16 seen = _mm512_mask_cmp_ps_mask(in, mv, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            const __m512 v = _mm512_maskz_loadu_ps(seen, sc + r);
            tops = _mm512_mask_max_ps(tops, seen, tops, v);
            /* compressed in registers, stored whole (the arrays have 16 spare entries): a
             * compressing store to memory is microcoded and ~10x slower on AMD Zen 4 */
            _mm512_storeu_ps(s->weights + n, _mm512_maskz_compress_ps(seen, v));
            _mm512_storeu_si512(s->list + n, _mm512_maskz_compress_epi32(seen, _mm512_add_epi32(_mm512_set1_epi32((int32_t)r), lanes)));
            n += __builtin_popcount(seen);
        }
        const float top = _mm512_reduce_max_ps(tops);
        /* e^(score - max) and their sum, 16 lanes over the list, then across the lanes */
        __m512 sum = _mm512_setzero_ps();
        int32_t t = 0;
        for (; t + 16 <= n; t += 16) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s->weights + t), _mm512_set1_ps(top)));
            _mm512_storeu_ps(s->weights + t, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (t < n) {
            const __mmask16 tail = (__mmask16)((1u << (n - t)) - 1);
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s->weights + t), _mm512_set1_ps(top)));
            _mm512_mask_storeu_ps(s->weights + t, tail, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
        }
        const float total = _mm512_reduce_add_ps(sum), inv = total == 0.0f ? 0.0f : 1.0f / total;

        float *out = (float *)((char *)dst->data + h * dst->nb[1] + (gr->q0 + j0 + j) * dst->nb[2]);
        const char *v0 = (const char *)vp->data + kvh * hdv * sizeof(ggml_fp16_t);
        for (int64_t d0 = 0; d0 < hdv; d0 += 16 * V_REGS) {
            const int64_t w = hdv - d0 < 16 * V_REGS ? hdv - d0 : 16 * V_REGS;
            sum_v(out + d0, v0 + d0 * sizeof(ggml_fp16_t), vp->nb[1], s->rows, s->list, s->weights, n, (int)(w / 16), inv);
        }
    }
}

/* src: q, kp, vp; userdata: the layer's call. Thread ith takes every nth work item. */
static void attention_op(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const layer_call *call = userdata;
    pie_attn_store *st = call->m->attn_cpu;
    const pie_plan *p = &call->m->plan;
    const int32_t n_head = call->m->hp.n_head;
    if (nth > st->n_slots) nth = st->n_slots; /* never: passes run at most the threads opened with */
    if (ith >= nth) return;
    scratch *s = &st->slots[ith];
    int64_t item = 0;
    for (int32_t gi = 0; gi < p->n_groups; gi++) {
        const pie_plan_group *gr = &p->groups[gi];
        for (int32_t j0 = 0; j0 < gr->n_q; j0 += QUERIES)
            for (int32_t h = 0; h < n_head; h++, item++) {
                if (item % nth != ith) continue;
                attend(call, gr, h, j0, gr->n_q - j0 < QUERIES ? gr->n_q - j0 : QUERIES, dst->src[0], dst->src[1],
                       dst->src[2], dst, s);
            }
    }
}

/* Attention of layer il through this kernel: [head_dim_v, n_head, n_tokens], or NULL when it does
 * not take the layer (pie_attention then runs ggml's). */
struct ggml_tensor *pie_attn_cpu(pie_graph *g, int il, struct ggml_tensor *q, struct ggml_tensor *kp,
                                 struct ggml_tensor *vp, float kq_scale) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    if (!m->attn_cpu || m->place.layer_dev[il] != m->place.n_dev - 1 || kp->type != GGML_TYPE_F16 ||
        vp->type != GGML_TYPE_F16 || q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float) || hp->attn_softcap != 0.0f ||
        m->w.layers[il].attn_sinks || hp->head_dim % 16 || hp->head_dim_v % 16 || hp->head_dim > MAX_DIM ||
        hp->head_dim_v > MAX_DIM)
        return NULL;
    layer_call *call = &m->attn_cpu->calls[il];
    *call = (layer_call){ .m = m, .il = il, .scale = kq_scale };
    struct ggml_tensor *args[3] = { q, kp, vp };
    return ggml_custom_4d(g->ctx, GGML_TYPE_F32, hp->head_dim_v, hp->n_head, g->n_tokens, 1, args, 3, attention_op,
                          GGML_N_TASKS_MAX, call); /* [head_dim_v, n_head, n_tokens] */
}

#else

struct ggml_tensor *pie_attn_cpu(pie_graph *g, int il, struct ggml_tensor *q, struct ggml_tensor *kp,
                                 struct ggml_tensor *vp, float kq_scale) {
    (void)g; (void)il; (void)q; (void)kp; (void)vp; (void)kq_scale;
    return NULL;
}

#endif
