/*
 * sampler.c — rows of logits in, tokens out (see sampler.h for the contract).
 *
 * What a row samples from (the reference semantics, kept exactly):
 *   1. candidates = tokens the bitmask allows with a finite logit, in id order, value = logit /
 *      temperature (a value that overflows makes the row greedy);
 *   2. greedy: the lowest id holding the largest candidate logit;
 *      otherwise: top_k keeps the k best (sorted best first: larger value, then lower id); top_p
 *      keeps the smallest best-first prefix whose mass reaches top_p times the mass of all
 *      candidates; min_p keeps values >= max + log(min_p) in their order; then one splitmix64
 *      draw, seeded by seed, walks the kept tokens in that order;
 *   3. probes over the RAW logits (log-softmax of the chosen token, top-k distribution), which
 *      ignore the bitmask and the temperature: they describe what the model predicted.
 *
 * `reference_draw` does exactly that over a materialised candidate array. With a 262k vocabulary
 * that array, its sums and its sorting cost milliseconds a row, so each sampler shape has a fast
 * path that reaches the same token without it:
 *   - one vectorized scan gives the largest candidate logit (and magnitude) and the max of every
 *     block of 64 ids, so later passes skip blocks that cannot hold a kept token;
 *   - top_k: a bounded heap that skips blocks whose max cannot enter it;
 *   - min_p alone: collect the tokens above the threshold (usually a few blocks);
 *   - top_p: the total mass from one vectorized pass, then only the tokens above a threshold
 *     that provably holds enough mass are collected and sorted (the nucleus, not the vocabulary);
 *   - temperature alone: block sums locate the drawn token, one block is walked.
 * Every term is the same float as the reference's (same operations, no fused multiply-add). The
 * reference adds the terms one after another in double; the fast paths add them in another order,
 * which can differ by a few n 2^-53 of the total (sum_slack). A fast path therefore only answers
 * when every comparison it made (the top-p cut, the drawn token's cumulative bounds) clears that
 * bound; otherwise (about once in 10^4 rows on a 262k vocabulary) the row falls back to
 * reference_draw. Same seed, same logits: same token (tests/test_sampler_exact.py).
 */
#include "sampler.h"
#include "status.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16    /* independent accumulators: a multiple of every SIMD width up to 512 bits */
#define BLOCK 64    /* ids per block of the scan: two mask words, four lane groups             */
#define HEAP_MAX 4096 /* top_k up to this uses the block-skipping heap, above it the reference */

/* ------------------------------------------------------------------------------------------ */
/* Scratch                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    float   val; /* logit (divided by temperature once sampling starts) */
    int32_t id;  /* token id                                            */
} cand;

typedef struct {
    cand   *c;         /* [n_vocab] candidates, reordered in place by the filters  */
    float  *block_max; /* [n_blocks] largest candidate logit per block, or -inf    */
    double *block_sum; /* [n_blocks] candidate mass per block (temperature alone)  */
} worker_scratch;

struct pie_sampler_scratch {
    int32_t         n_vocab;
    int32_t         n_workers;
    worker_scratch *w; /* [n_workers]; w[0] serves pie_sample_row */
};

static int32_t n_blocks(int32_t n_vocab) { return (n_vocab + BLOCK - 1) / BLOCK; }

static bool worker_init(worker_scratch *w, int32_t n_vocab) {
    w->c         = malloc(sizeof(cand) * (size_t)n_vocab);
    w->block_max = malloc(sizeof(float) * (size_t)n_blocks(n_vocab));
    w->block_sum = malloc(sizeof(double) * (size_t)n_blocks(n_vocab));
    return w->c && w->block_max && w->block_sum;
}

static void worker_free(worker_scratch *w) {
    free(w->c);
    free(w->block_max);
    free(w->block_sum);
}

/* Grows the scratch to n workers (called outside any parallel region). */
static bool ensure_workers(pie_sampler_scratch *s, int32_t n) {
    if (n <= s->n_workers) return true;
    worker_scratch *grown = realloc(s->w, sizeof(worker_scratch) * (size_t)n);
    if (!grown) return false;
    s->w = grown;
    for (; s->n_workers < n; s->n_workers++) {
        worker_scratch *w = &s->w[s->n_workers];
        if (!worker_init(w, s->n_vocab)) {
            worker_free(w);
            return false;
        }
    }
    return true;
}

pie_sampler_scratch *pie_sampler_scratch_new(int32_t n_vocab) {
    if (n_vocab <= 0) return NULL;
    pie_sampler_scratch *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->n_vocab = n_vocab;
    if (!ensure_workers(s, 1)) {
        pie_sampler_scratch_free(s);
        return NULL;
    }
    return s;
}

void pie_sampler_scratch_free(pie_sampler_scratch *s) {
    if (!s) return;
    for (int32_t i = 0; i < s->n_workers; i++) worker_free(&s->w[i]);
    free(s->w);
    free(s);
}

/* ------------------------------------------------------------------------------------------ */
/* Seeded random numbers: splitmix64 (Steele, Lea, Flood 2014)                                */
/* ------------------------------------------------------------------------------------------ */

static uint64_t splitmix64_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform double in [0, 1) from the top 53 bits: the one number a row's draw consumes. */
static double uniform01(uint64_t seed) {
    uint64_t state = seed;
    return (double)(splitmix64_next(&state) >> 11) * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------------------------------ */
/* Order and selection: the k best candidates, sorted best first                              */
/* ------------------------------------------------------------------------------------------ */

/* "a is better than b": larger value, then lower id, so every order is total and reproducible. */
static int better(const cand *a, const cand *b) {
    return a->val > b->val || (a->val == b->val && a->id < b->id);
}

static int cmp_best_first(const void *pa, const void *pb) {
    const cand *a = pa, *b = pb;
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

static void swap_cand(cand *a, cand *b) {
    cand t = *a;
    *a = *b;
    *b = t;
}

/* Quickselect: reorders c[0..n) so that its k best come first (in no particular order).
 * Average O(n); the median-of-three pivot avoids the sorted-input worst case. */
static void partition_best(cand *c, int32_t n, int32_t k) {
    int32_t lo = 0, hi = n - 1;
    while (lo < hi && k > lo && k <= hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (better(&c[mid], &c[lo])) swap_cand(&c[mid], &c[lo]);
        if (better(&c[hi], &c[lo])) swap_cand(&c[hi], &c[lo]);
        if (better(&c[hi], &c[mid])) swap_cand(&c[hi], &c[mid]);
        const cand pivot = c[mid]; /* median of the three */
        int32_t i = lo, j = hi;
        while (i <= j) { /* Hoare partition: better than pivot to the left */
            while (better(&c[i], &pivot)) i++;
            while (better(&pivot, &c[j])) j--;
            if (i <= j) swap_cand(&c[i++], &c[j--]);
        }
        if (k <= j) hi = j;        /* the boundary lies in the left part  */
        else if (k >= i) lo = i;   /* ... or in the right part            */
        else break;                /* everything left of i is in the k    */
    }
}

/* c[0..k) become the k best of c[0..n), sorted best first: O(n + k log k). */
static void select_top(cand *c, int32_t n, int32_t k) {
    if (k <= 0) return;
    if (k < n) partition_best(c, n, k);
    qsort(c, (size_t)k, sizeof(cand), cmp_best_first);
}

/* Min-heap on "better" over h[0..n): the root is the worst kept candidate. */
static void heap_sift_down(cand *h, int32_t n, int32_t i) {
    for (;;) {
        int32_t worst = i, l = 2 * i + 1, r = 2 * i + 2;
        if (l < n && better(&h[worst], &h[l])) worst = l;
        if (r < n && better(&h[worst], &h[r])) worst = r;
        if (worst == i) return;
        swap_cand(&h[i], &h[worst]);
        i = worst;
    }
}

static void heap_offer(cand *h, int32_t k, float val, int32_t id) {
    const cand x = { val, id };
    if (better(&x, &h[0])) {
        h[0] = x;
        heap_sift_down(h, k, 0);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Row kernels: fixed-width blocks (a constant inner trip count) so the compiler vectorizes   */
/* them; the build adds -fno-trapping-math (selects vectorize) and -ffp-contract=off (no FMA  */
/* contraction: every value is the same with or without wider SIMD) for this file             */
/* ------------------------------------------------------------------------------------------ */

/* Largest x[i] that is not NaN (+inf counts) over x[0..n); -inf when there is none. */
static float row_max(const float *x, int32_t n) {
    float acc[LANES];
    for (int j = 0; j < LANES; j++) acc[j] = -INFINITY;
    int32_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j]; /* NaN: false */
    float mx = -INFINITY;
    for (int j = 0; j < LANES; j++) mx = acc[j] > mx ? acc[j] : mx;
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

/* Greedy without a mask: the lowest id holding the largest finite logit, -1 when none is finite.
 * One vectorized pass: each lane keeps its first maximum and where it was; ties across lanes go to
 * the lower id, and the tail (higher ids) must be strictly larger. */
static int32_t argmax_finite(const float *x, int32_t n) {
    float   acc[LANES];
    int32_t at[LANES];
    for (int j = 0; j < LANES; j++) acc[j] = -INFINITY, at[j] = -1;
    int32_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float v    = x[i + j];
            const int   more = v > acc[j] && v < INFINITY; /* NaN: false */
            acc[j] = more ? v : acc[j];
            at[j]  = more ? i + j : at[j];
        }
    float   mx   = -INFINITY;
    int32_t best = -1;
    for (int j = 0; j < LANES; j++)
        if (acc[j] > mx || (acc[j] == mx && at[j] < best)) mx = acc[j], best = at[j];
    for (; i < n; i++)
        if (x[i] > mx && x[i] < INFINITY) mx = x[i], best = i;
    return mx == -INFINITY ? -1 : best;
}

/* Greedy under a bitmask: whole words of 32 ids, empty words skipped; strict > keeps the lowest
 * id on ties. */
static int32_t argmax_masked(const float *x, int32_t n, const uint32_t *mask) {
    int32_t best = -1;
    float   mx   = -INFINITY;
    for (int32_t w = 0; w * 32 < n; w++) {
        const uint32_t bits = mask[w];
        if (!bits) continue;
        const int32_t end = n - w * 32 < 32 ? n - w * 32 : 32;
        for (int32_t b = 0; b < end; b++) {
            const float v = x[w * 32 + b];
            if (((bits >> b) & 1u) && v > mx && v < INFINITY) {
                mx   = v;
                best = w * 32 + b;
            }
        }
    }
    return best;
}

/*
 * e^x for x <= 0 in plain float arithmetic the compiler can vectorize (libm's expf is a call per
 * element). x = k ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its degree-6
 * Taylor polynomial (truncation < 1.3e-7 relative), 2^k built in the exponent bits. Inputs
 * below -87 (and NaN) give e^-87 ~ 1.6e-38 instead of less: negligible next to the row's
 * maximum term, which is 1.
 */
static inline float exp_nonpos(float x) {
    x = x > -87.0f ? x : -87.0f;
    const int32_t k = (int32_t)(x * 1.44269504f - 0.5f); /* round(x / ln2): x <= 0, truncation is toward 0 */
    const float kf = (float)k;
    const float r = (x - kf * 0.693145752f) - kf * 1.42860677e-6f; /* ln2 = hi + lo, hi exact in float */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } scale = { .u = (uint32_t)(k + 127) << 23 }; /* 2^k, k >= -126 */
    return p * scale.f;
}

/* sum of e^(x[i] - mx) over x[0..n), mx >= every x[i]. Float lanes within blocks of 1024 entries
 * (a lane adds 64 terms, each <= 1), blocks summed in double: relative error ~1e-6 even for a
 * 262k vocabulary. */
static double row_sum_exp(const float *x, int32_t n, float mx) {
    double  z = 0.0;
    int32_t i = 0;
    for (; i + 1024 <= n; i += 1024) {
        float acc[LANES] = { 0 };
        for (int32_t b = 0; b < 1024; b += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += exp_nonpos(x[i + b + j] - mx);
        float s = 0.0f;
        for (int j = 0; j < LANES; j++) s += acc[j];
        z += s;
    }
    for (; i < n; i++) z += exp_nonpos(x[i] - mx);
    return z;
}

/* A token can be drawn when the bitmask (if any) allows it and its logit is finite. */
static inline bool allowed(const uint32_t *mask, int32_t id, float logit) {
    if (mask && !((mask[id >> 5] >> (id & 31)) & 1u)) return false;
    return isfinite(logit);
}

/* y[j] = x[j] when token base + j is a candidate (allowed and finite), else -inf; a full block. */
static inline void block_values(const float *x, const uint32_t *mask_words, float *y) {
    for (int j = 0; j < BLOCK; j++) y[j] = fabsf(x[j]) < INFINITY ? x[j] : -INFINITY;
    if (mask_words)
        for (int j = 0; j < BLOCK; j++) y[j] = (mask_words[j >> 5] >> (j & 31)) & 1u ? y[j] : -INFINITY;
}

/* The partial last block as block_values would see it (ids n - len .. n - 1). */
static void tail_values(const float *x, int32_t base, int32_t len, const uint32_t *mask, float *y) {
    for (int32_t j = 0; j < len; j++) y[j] = allowed(mask, base + j, x[base + j]) ? x[base + j] : -INFINITY;
    for (int32_t j = len; j < BLOCK; j++) y[j] = -INFINITY;
}

/* What the scan of a row found about its candidates. */
typedef struct {
    float hi;   /* largest candidate logit, -inf when there is no candidate */
    float amax; /* largest |candidate logit|                              */
} row_scan;

/* One pass over a row: the largest candidate logit and magnitude, and in block_max[b] the
 * largest candidate logit of ids [64b, 64b+64) (-inf when the block has none). */
static row_scan scan_candidates(const float *x, int32_t n, const uint32_t *mask, float *block_max) {
    row_scan r = { -INFINITY, 0.0f };
    float    y[BLOCK];
    for (int32_t b = 0; b * BLOCK < n; b++) {
        if ((b + 1) * BLOCK <= n) block_values(x + (size_t)b * BLOCK, mask ? mask + 2 * (size_t)b : NULL, y);
        else tail_values(x, b * BLOCK, n - b * BLOCK, mask, y);
        float hi[LANES], am[LANES];
        for (int j = 0; j < LANES; j++) hi[j] = -INFINITY, am[j] = 0.0f;
        for (int g = 0; g < BLOCK; g += LANES)
            for (int j = 0; j < LANES; j++) {
                const float v = y[g + j], a = fabsf(v) < INFINITY ? fabsf(v) : 0.0f;
                hi[j] = v > hi[j] ? v : hi[j];
                am[j] = a > am[j] ? a : am[j];
            }
        float bh = -INFINITY;
        for (int j = 0; j < LANES; j++) {
            bh = hi[j] > bh ? hi[j] : bh;
            r.amax = am[j] > r.amax ? am[j] : r.amax;
        }
        block_max[b] = bh;
        r.hi = bh > r.hi ? bh : r.hi;
    }
    return r;
}

/* The mass of every block, e^(x * inv_t - mxs) over its candidates (what the reference sums),
 * into block_sum; returns the total. Terms in float as the reference computes them, sums in
 * double: eight lanes in a block, then the blocks in order. */
static double block_masses(const float *x, int32_t n, const uint32_t *mask, const float *block_max,
                           float inv_t, float mxs, double *block_sum) {
    double z = 0.0;
    float  y[BLOCK], e[BLOCK];
    for (int32_t b = 0; b * BLOCK < n; b++) {
        double s = 0.0;
        if (block_max[b] > -INFINITY) {
            if ((b + 1) * BLOCK <= n) block_values(x + (size_t)b * BLOCK, mask ? mask + 2 * (size_t)b : NULL, y);
            else tail_values(x, b * BLOCK, n - b * BLOCK, mask, y);
            /* non-candidates are -inf: exp_nonpos clamps them harmlessly, then they count 0 */
            for (int j = 0; j < BLOCK; j++) e[j] = exp_nonpos(y[j] * inv_t - mxs);
            for (int j = 0; j < BLOCK; j++) e[j] = y[j] > -INFINITY ? e[j] : 0.0f;
            double acc[8] = { 0 };
            for (int i = 0; i < BLOCK; i += 8)
                for (int j = 0; j < 8; j++) acc[j] += (double)e[i + j];
            s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
        block_sum[b] = s;
        z += s;
    }
    return z;
}

/* ------------------------------------------------------------------------------------------ */
/* Probes over the raw logits                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* max and log(sum exp(l - max)) over the raw logits; *max = -inf when none is finite. NaN and
 * -inf entries add nothing (up to e^-87 each); a +inf entry makes every finite logprob -inf. */
static void raw_log_norm(const float *logits, int32_t n_vocab, float *out_max, double *out_log_z) {
    const float  mx = row_max(logits, n_vocab);
    const double z  = isfinite(mx) ? row_sum_exp(logits, n_vocab, mx) : 0.0;
    *out_max   = mx;
    *out_log_z = z > 0.0 ? log(z) : 0.0;
}

static float raw_logprob(const float *logits, int32_t token, float mx, double log_z) {
    float l = logits[token];
    if (!isfinite(l) || !isfinite(mx)) return -INFINITY;
    return (float)((double)l - mx - log_z);
}

/* The k most probable raw logits (NaN ranks as -inf), sorted best first, into c[0..k). A bounded
 * heap; a block of 64 whose max cannot beat the heap's worst is skipped whole (its ids are
 * higher than every id in the heap, so a tie loses too). */
static void raw_top(const float *x, int32_t n, cand *c, int32_t k) {
    if (k > HEAP_MAX) {
        for (int32_t i = 0; i < n; i++) c[i] = (cand){ isnan(x[i]) ? -INFINITY : x[i], i };
        select_top(c, n, k);
        return;
    }
    for (int32_t i = 0; i < k; i++) c[i] = (cand){ isnan(x[i]) ? -INFINITY : x[i], i };
    for (int32_t i = k / 2 - 1; i >= 0; i--) heap_sift_down(c, k, i);
    int32_t i = k;
    for (; i < n && i % BLOCK; i++) heap_offer(c, k, isnan(x[i]) ? -INFINITY : x[i], i);
    for (; i < n; i += BLOCK) {
        const int32_t len = n - i < BLOCK ? n - i : BLOCK;
        if (len == BLOCK && row_max(x + i, BLOCK) <= c[0].val) continue;
        for (int32_t j = i; j < i + len; j++) heap_offer(c, k, isnan(x[j]) ? -INFINITY : x[j], j);
    }
    qsort(c, (size_t)k, sizeof(cand), cmp_best_first);
}

/* ------------------------------------------------------------------------------------------ */
/* Filters over a candidate list (values already divided by temperature)                       */
/* ------------------------------------------------------------------------------------------ */

/* Sorts the best-first prefix of c[0..n) until the cumulative mass e^(val - mx) reaches target;
 * returns the length of the shortest prefix that reaches it, or n when none does (then c[0..n) is
 * all sorted). The prefix grows by doubling and each round only partitions the rest, so a peaked
 * distribution touches a few hundred entries. *cum_at / *cum_before: the cumulative mass at the
 * returned prefix and one entry before it. */
static int32_t sorted_prefix(cand *c, int32_t n, float mx, double target, double *cum_at, double *cum_before) {
    double  cum  = 0.0;
    int32_t done = 0; /* c[0..done) is sorted and holds less than the target */
    int32_t m    = n < 128 ? n : 128;
    for (;;) {
        partition_best(c + done, n - done, m - done);
        qsort(c + done, (size_t)(m - done), sizeof(cand), cmp_best_first);
        for (int32_t i = done; i < m; i++) {
            const double before = cum;
            cum += exp_nonpos(c[i].val - mx);
            if (cum >= target) {
                *cum_at = cum, *cum_before = before;
                return i + 1;
            }
        }
        if (m == n) {
            *cum_at = *cum_before = cum;
            return n;
        }
        done = m;
        m = m > n / 2 ? n : 2 * m;
    }
}

/* The reference top-p: the smallest best-first prefix whose mass (over all of c[0..n)) reaches
 * top_p comes first, sorted; returns its length (n when rounding leaves the sum a hair short). */
static int32_t top_p_prefix(cand *c, int32_t n, float top_p) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < n; i++) if (c[i].val > mx) mx = c[i].val;
    double z = 0.0;
    for (int32_t i = 0; i < n; i++) z += exp_nonpos(c[i].val - mx);
    double at, before;
    return sorted_prefix(c, n, mx, (double)top_p * z, &at, &before);
}

/* Keeps candidates with p >= min_p * p_max, i.e. value >= max + log(min_p); preserves order. */
static int32_t min_p_filter(cand *c, int32_t n, float min_p) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < n; i++) if (c[i].val > mx) mx = c[i].val;
    const double threshold = (double)mx + log((double)min_p);
    int32_t kept = 0;
    for (int32_t i = 0; i < n; i++) {
        if ((double)c[i].val >= threshold) c[kept++] = c[i];
    }
    return kept;
}

/* Draws one candidate with probability proportional to exp(value), walking c[0..n) in order;
 * overwrites the values with the unnormalised probabilities. */
static int32_t draw(cand *c, int32_t n, uint64_t seed) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < n; i++) if (c[i].val > mx) mx = c[i].val;
    double z = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].val = exp_nonpos(c[i].val - mx);
        z += c[i].val;
    }
    const double u = uniform01(seed) * z;
    double cum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        cum += c[i].val;
        if (u < cum) return c[i].id;
    }
    return c[n - 1].id; /* u landed in the rounding gap at the very end */
}

/* top_p then min_p over c[0..n) (best first when a filter needs it), then the draw. */
static int32_t filter_and_draw(cand *c, int32_t n, const pie_sampler *p) {
    if (p->top_p < 1.0f) n = top_p_prefix(c, n, p->top_p);
    if (p->min_p > 0.0f) n = min_p_filter(c, n, p->min_p);
    return draw(c, n, p->seed);
}

/* ------------------------------------------------------------------------------------------ */
/* Sampling a row: the reference and the fast paths                                            */
/* ------------------------------------------------------------------------------------------ */

/* Everything a sampled (non-greedy) row needs, set up by sample_tempered. */
typedef struct {
    const float    *x;     /* [n] raw logits                                         */
    int32_t         n;
    const uint32_t *mask;  /* or NULL                                                */
    float           inv_t; /* 1 / temperature                                        */
    float           mxs;   /* largest candidate value (largest logit * inv_t)         */
    worker_scratch *w;     /* block_max filled by the scan                           */
} row_ctx;

/* The reference: every candidate materialised in id order, then the filters in order. */
static int32_t reference_draw(const row_ctx *r, const pie_sampler *p) {
    cand   *c = r->w->c;
    int32_t n = 0;
    for (int32_t i = 0; i < r->n; i++)
        if (allowed(r->mask, i, r->x[i])) c[n++] = (cand){ r->x[i] * r->inv_t, i };
    if (p->top_k > 0 && p->top_k < n) {
        select_top(c, n, p->top_k);
        n = p->top_k;
    }
    return filter_and_draw(c, n, p);
}

/* How far a fast path's comparison may be from the reference's. A double sum of n terms (each
 * <= 1, total z) in any order is within (n - 1) 2^-53 z of the exact sum, so two orders differ by
 * at most 2 (n - 1) 2^-53 z; a comparison of two such sums (a draw point against a cumulative
 * mass) by twice that. Doubled again for margin and the roundings of the products. */
static double sum_slack(int32_t n, double z) { return (8.0 * n + 256.0) * 0x1p-53 * z; }

/* What a fast path returns instead of a token. */
#define UNDECIDED (-2) /* a rounding margin was too thin: the reference decides            */
#define NO_TOP_K  (-3) /* top_k keeps every candidate: the other filters run over them all */

/* top_k: the k best candidates by a block-skipping heap (same set and order as the reference's
 * selection, which is unique), then the reference filters over those k. When there are no more
 * than k candidates, the reference applies no top_k (and keeps id order): NO_TOP_K. */
static int32_t fast_top_k(const row_ctx *r, const pie_sampler *p) {
    cand *h = r->w->c;
    const int32_t k = p->top_k;
    if (k > HEAP_MAX) return UNDECIDED;
    int32_t filled = 0, i = 0;
    for (; i < r->n && filled < k; i++)
        if (allowed(r->mask, i, r->x[i])) h[filled++] = (cand){ r->x[i] * r->inv_t, i };
    if (filled < k) return NO_TOP_K;
    for (int32_t j = k / 2 - 1; j >= 0; j--) heap_sift_down(h, k, j);
    bool more = false; /* a candidate beyond the first k */
    for (; i < r->n && i % BLOCK; i++)
        if (allowed(r->mask, i, r->x[i])) {
            more = true;
            heap_offer(h, k, r->x[i] * r->inv_t, i);
        }
    for (; i < r->n; i += BLOCK) {
        const float top = r->w->block_max[i / BLOCK]; /* -inf: no candidate */
        more |= top > -INFINITY;
        if (top * r->inv_t <= h[0].val) continue;
        const int32_t end = r->n - i < BLOCK ? r->n : i + BLOCK;
        for (int32_t j = i; j < end; j++)
            if (allowed(r->mask, j, r->x[j])) heap_offer(h, k, r->x[j] * r->inv_t, j);
    }
    if (!more) return NO_TOP_K;
    qsort(h, (size_t)k, sizeof(cand), cmp_best_first);
    return filter_and_draw(h, k, p);
}

/* The candidates with value >= threshold, in id order, into c; returns how many. Blocks whose
 * largest value is below it are skipped. */
static int32_t collect_above(const row_ctx *r, double threshold, cand *c) {
    int32_t n = 0;
    for (int32_t b = 0; b * BLOCK < r->n; b++) {
        const float top = r->w->block_max[b] * r->inv_t; /* -inf: no candidate */
        if (!(top > -INFINITY) || !((double)top >= threshold)) continue;
        const int32_t end = r->n - b * BLOCK < BLOCK ? r->n : (b + 1) * BLOCK;
        for (int32_t i = b * BLOCK; i < end; i++) {
            const float v = r->x[i] * r->inv_t;
            if (allowed(r->mask, i, r->x[i]) && (double)v >= threshold) c[n++] = (cand){ v, i };
        }
    }
    return n;
}

/* min_p alone: the reference keeps value >= max + log(min_p) of every candidate in id order;
 * only the blocks that hold such a value are read. */
static int32_t fast_min_p(const row_ctx *r, const pie_sampler *p) {
    const int32_t n = collect_above(r, (double)r->mxs + log((double)p->min_p), r->w->c);
    return draw(r->w->c, n, p->seed);
}

/* top_p without top_k: the total mass from the block sums, then only candidates within `cut` of
 * the max are collected and sorted, with cut widened until they hold the target mass. The cut
 * (where the prefix reaches top_p * mass) must clear the target by the sums' slack on both
 * sides, else the reference decides. Returns UNDECIDED when unsure. */
static int32_t fast_top_p(const row_ctx *r, const pie_sampler *p) {
    const double z      = block_masses(r->x, r->n, r->mask, r->w->block_max, r->inv_t, r->mxs, r->w->block_sum);
    const double target = (double)p->top_p * z;
    const double slack  = sum_slack(r->n, z) + 0x1p-50 * target;
    cand *c = r->w->c;
    for (double cut = 4.0;; cut *= 2.0) {
        const bool    all  = cut > 87.0; /* e^-87: below that the terms are clamped, take all */
        const int32_t n    = collect_above(r, all ? -INFINITY : (double)r->mxs - cut, c);
        double        mass = 0.0;
        for (int32_t i = 0; i < n; i++) mass += exp_nonpos(c[i].val - r->mxs);
        if (mass < target + slack && !all) continue; /* the nucleus may reach further */
        double at, before;
        const int32_t keep = sorted_prefix(c, n, r->mxs, target, &at, &before);
        if (!(at >= target + slack && before < target - slack)) return UNDECIDED;
        if (p->min_p > 0.0f) return draw(c, min_p_filter(c, keep, p->min_p), p->seed);
        return draw(c, keep, p->seed);
    }
}

/* Temperature alone: the reference walks every candidate in id order until the cumulative mass
 * passes u * z. The block sums find the block, one block is walked; both the draw point and the
 * cumulative masses around the chosen token must clear the slack. Returns UNDECIDED when unsure. */
static int32_t fast_plain(const row_ctx *r, const pie_sampler *p) {
    const double *bs    = r->w->block_sum;
    const double  z     = block_masses(r->x, r->n, r->mask, r->w->block_max, r->inv_t, r->mxs, r->w->block_sum);
    const double  u     = uniform01(p->seed) * z;
    const double  slack = sum_slack(r->n, z);
    double  cum = 0.0;
    int32_t b   = 0;
    const int32_t nb = n_blocks(r->n);
    while (b < nb && !(u < cum + bs[b])) cum += bs[b++];
    if (b == nb) return UNDECIDED;
    const int32_t end = r->n - b * BLOCK < BLOCK ? r->n : (b + 1) * BLOCK;
    for (int32_t i = b * BLOCK; i < end; i++) {
        if (!allowed(r->mask, i, r->x[i])) continue;
        const double before = cum;
        cum += exp_nonpos(r->x[i] * r->inv_t - r->mxs);
        if (u < cum) return cum - u > slack && u - before >= slack ? i : UNDECIDED;
    }
    return UNDECIDED;
}

/* A row with temperature > 0; token, or -1 when no candidate. */
static int32_t sample_tempered(worker_scratch *w, const float *x, int32_t n, const uint32_t *mask,
                               const pie_sampler *p) {
    row_ctx r = { .x = x, .n = n, .mask = mask, .inv_t = 1.0f / p->temperature, .w = w };
    const row_scan scan = scan_candidates(x, n, mask, w->block_max);
    if (scan.hi == -INFINITY) return -1;
    /* A temperature so small that logit / temperature overflows is greedy in the limit. */
    if (!isfinite(scan.amax * r.inv_t)) return mask ? argmax_masked(x, n, mask) : argmax_finite(x, n);
    r.mxs = scan.hi * r.inv_t; /* multiplying by inv_t > 0 keeps the order: the max's value */

    int32_t token = p->top_k > 0 ? fast_top_k(&r, p) : NO_TOP_K;
    if (token == NO_TOP_K) {
        if (p->top_p < 1.0f) token = fast_top_p(&r, p);
        else if (p->min_p > 0.0f) token = fast_min_p(&r, p);
        else token = fast_plain(&r, p);
    }
    return token == UNDECIDED ? reference_draw(&r, p) : token;
}

static int32_t check_params(const pie_sampler *p, int32_t n_vocab, int32_t top_k_out) {
    if (isnan(p->temperature) || isinf(p->temperature))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "sampler temperature must be finite (got %g)",
                             (double)p->temperature);
    if (p->top_k < 0)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "sampler top_k must be >= 0 (got %d)", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "sampler top_p must be in (0, 1] (got %g)",
                             (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "sampler min_p must be in [0, 1] (got %g)",
                             (double)p->min_p);
    if (top_k_out < 0 || top_k_out > n_vocab)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT,
                             "returned top_k must be in [0, n_vocab=%d] (got %d)", n_vocab, top_k_out);
    return PIE_OK;
}

static int32_t sample_one(worker_scratch *w, const float *logits, int32_t n_vocab, const uint32_t *mask,
                          const pie_sampler *sampler, int32_t *out_token, float *out_logprob,
                          int32_t top_k, int32_t *out_top_ids, float *out_top_probs) {
    int32_t st = check_params(sampler, n_vocab, top_k);
    if (st != PIE_OK) return st;
    if (top_k > 0 && (!out_top_ids || !out_top_probs))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "top_k %d requested without output buffers", top_k);

    /* --- choose the token ----------------------------------------------------------------- */
    int32_t token;
    if (sampler->temperature <= 0.0f) token = mask ? argmax_masked(logits, n_vocab, mask) : argmax_finite(logits, n_vocab);
    else token = sample_tempered(w, logits, n_vocab, mask, sampler);
    if (token < 0)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT,
                             mask ? "the logit mask allows no token with a finite logit"
                                  : "every logit is -inf or NaN");
    *out_token = token;

    /* --- probes over the raw logits, only when asked --------------------------------------- */
    if (out_logprob || top_k > 0) {
        float  mx;
        double log_z;
        raw_log_norm(logits, n_vocab, &mx, &log_z);
        if (out_logprob) *out_logprob = raw_logprob(logits, token, mx, log_z);
        if (top_k > 0) {
            cand *c = w->c;
            raw_top(logits, n_vocab, c, top_k);
            for (int32_t i = 0; i < top_k; i++) {
                out_top_ids[i]   = c[i].id;
                out_top_probs[i] = isfinite(mx) && isfinite(c[i].val)
                                       ? (float)exp((double)c[i].val - mx - log_z) : 0.0f;
            }
        }
    }
    return PIE_OK;
}

int32_t pie_sample_row(pie_sampler_scratch *s, const float *logits, int32_t n_vocab,
                       const uint32_t *mask, const pie_sampler *sampler,
                       int32_t *out_token, float *out_logprob,
                       int32_t top_k, int32_t *out_top_ids, float *out_top_probs) {
    if (!s || !logits || !sampler || !out_token || n_vocab <= 0 || n_vocab > s->n_vocab)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "pie_sample_row: bad arguments (n_vocab %d)", n_vocab);
    return sample_one(&s->w[0], logits, n_vocab, mask, sampler, out_token, out_logprob,
                      top_k, out_top_ids, out_top_probs);
}

/* ------------------------------------------------------------------------------------------ */
/* Many rows                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Below this many logits in all, threads cost more than they save. */
#define PARALLEL_MIN_LOGITS 65536

int32_t pie_sample_rows(pie_sampler_scratch *s, int32_t n_threads, int32_t n_rows,
                        const float *logits, int32_t n_vocab, const uint32_t *masks,
                        const pie_sampler *samplers, int32_t *out_tokens, float *out_logprobs,
                        int32_t top_k, int32_t *out_top_ids, float *out_top_probs,
                        int32_t *out_status) {
    if (!s || !logits || !samplers || !out_tokens || !out_status || n_rows < 0 || n_vocab <= 0 ||
        n_vocab > s->n_vocab)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "pie_sample_rows: bad arguments (n_vocab %d)", n_vocab);
    int32_t threads = n_threads < n_rows ? n_threads : n_rows;
    if ((int64_t)n_rows * n_vocab < PARALLEL_MIN_LOGITS || threads < 1) threads = 1;
#ifndef _OPENMP
    threads = 1; /* built without OpenMP: one thread */
#endif
    if (!ensure_workers(s, threads))
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate sampler scratch for %d threads", threads);
    const size_t words = ((size_t)n_vocab + 31) / 32;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
#endif
    for (int32_t r = 0; r < n_rows; r++) {
#ifdef _OPENMP
        worker_scratch *w = &s->w[omp_get_thread_num()];
#else
        worker_scratch *w = &s->w[0];
#endif
        out_status[r] = sample_one(w, logits + (size_t)r * n_vocab, n_vocab, masks ? masks + (size_t)r * words : NULL,
                                   &samplers[r], &out_tokens[r], out_logprobs ? &out_logprobs[r] : NULL, top_k,
                                   top_k > 0 ? out_top_ids + (size_t)r * top_k : NULL,
                                   top_k > 0 ? out_top_probs + (size_t)r * top_k : NULL);
    }
    return PIE_OK;
}
