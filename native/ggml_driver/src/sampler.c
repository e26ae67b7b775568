/*
 * sampler.c — one row of logits in, one token out (see sampler.h for the contract).
 *
 * Order of work for a row:
 *   1. validate the sampler parameters;
 *   2. candidates = tokens the bitmask allows with a finite logit (masked = -inf before anything);
 *   3. greedy: argmax over the candidates, lowest id on ties;
 *      otherwise: divide by temperature, keep top_k, then the smallest prefix reaching top_p,
 *      then tokens with p >= min_p * p_max, and draw one with a splitmix64 stream seeded by seed;
 *   4. probes over the RAW logits (log-softmax of the chosen token, top-k distribution), which
 *      ignore the bitmask and the temperature: they describe what the model predicted.
 *
 * A 262k vocabulary is the common case, so nothing sorts the whole vocabulary when it can be
 * avoided: top-k is a quickselect then a sort of k entries; top-p grows a sorted prefix by
 * doubling until it holds enough mass; min-p is one threshold pass. The candidate array lives in
 * the scratch, so a row allocates nothing.
 */
#include "sampler.h"
#include "status.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

/* ------------------------------------------------------------------------------------------ */
/* Scratch                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    float   val; /* logit (divided by temperature once sampling starts) */
    int32_t id;  /* token id                                            */
} cand;

struct pie_sampler_scratch {
    int32_t n_vocab;
    cand   *c; /* [n_vocab] candidates, reordered in place by the filters */
};

pie_sampler_scratch *pie_sampler_scratch_new(int32_t n_vocab) {
    if (n_vocab <= 0) return NULL;
    pie_sampler_scratch *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->n_vocab = n_vocab;
    s->c = malloc(sizeof(cand) * (size_t)n_vocab);
    if (!s->c) {
        free(s);
        return NULL;
    }
    return s;
}

void pie_sampler_scratch_free(pie_sampler_scratch *s) {
    if (!s) return;
    free(s->c);
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

/* Uniform double in [0, 1) from the top 53 bits. */
static double uniform01(uint64_t *state) {
    return (double)(splitmix64_next(state) >> 11) * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------------------------------ */
/* Partial selection: the k best candidates, then sorted best first                           */
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

/* Small k: a bounded heap in c[0..k) scanning the rest; most entries cost one comparison. */
static void heap_best(cand *c, int32_t n, int32_t k) {
    for (int32_t i = k / 2 - 1; i >= 0; i--) heap_sift_down(c, k, i);
    for (int32_t i = k; i < n; i++) {
        if (better(&c[i], &c[0])) {
            c[0] = c[i];
            heap_sift_down(c, k, 0);
        }
    }
}

/* c[0..k) become the k best of c[0..n), sorted best first. O(n log k) for small k, else
 * O(n + k log k). */
static void select_top(cand *c, int32_t n, int32_t k) {
    if (k <= 0) return;
    if (k < n) {
        if (k <= 256) heap_best(c, n, k);
        else partition_best(c, n, k);
    }
    qsort(c, (size_t)k, sizeof(cand), cmp_best_first);
}

/* ------------------------------------------------------------------------------------------ */
/* Row kernels: fixed-width blocks (a constant inner trip count) so the compiler vectorizes   */
/* them at -O2; the build adds -fno-trapping-math for this file so the selects vectorize too  */
/* ------------------------------------------------------------------------------------------ */

#define LANES 16 /* independent accumulators: a multiple of every SIMD width up to 512 bits */

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
 * One vectorized max over the finite values, then a scan that stops at the first match. */
static int32_t argmax_finite(const float *x, int32_t n) {
    float acc[LANES];
    for (int j = 0; j < LANES; j++) acc[j] = -INFINITY;
    int32_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float v = x[i + j];
            acc[j] = v > acc[j] && v < INFINITY ? v : acc[j];
        }
    float mx = -INFINITY;
    for (int j = 0; j < LANES; j++) mx = acc[j] > mx ? acc[j] : mx;
    for (; i < n; i++) mx = x[i] > mx && x[i] < INFINITY ? x[i] : mx;
    if (mx == -INFINITY) return -1;
    for (i = 0; x[i] != mx; i++) {}
    return i;
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

/* ------------------------------------------------------------------------------------------ */
/* Filters over the candidate list (values already divided by temperature)                      */
/* ------------------------------------------------------------------------------------------ */

/*
 * Reorders the candidates so that the smallest best-first prefix whose probability mass (over
 * all current candidates) reaches top_p comes first, sorted; returns its length. The sorted
 * prefix grows by doubling and each round only partitions the rest, so a peaked distribution
 * touches a few hundred entries and a flat one costs O(n) plus sorting what it keeps.
 */
static int32_t top_p_prefix(cand *c, int32_t n, float top_p) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < n; i++) if (c[i].val > mx) mx = c[i].val;
    double z = 0.0;
    for (int32_t i = 0; i < n; i++) z += exp_nonpos(c[i].val - mx);
    const double target = (double)top_p * z;

    double  cum  = 0.0;
    int32_t done = 0; /* c[0..done) is sorted and holds less than the target */
    int32_t m    = n < 128 ? n : 128;
    for (;;) {
        partition_best(c + done, n - done, m - done);
        qsort(c + done, (size_t)(m - done), sizeof(cand), cmp_best_first);
        for (int32_t i = done; i < m; i++) {
            cum += exp_nonpos(c[i].val - mx);
            if (cum >= target) return i + 1;
        }
        if (m == n) return n; /* rounding left the sum a hair short: keep all */
        done = m;
        m = m > n / 2 ? n : 2 * m;
    }
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

/* Draws one candidate with probability proportional to exp(value); overwrites the values with
 * the unnormalised probabilities. */
static int32_t draw(cand *c, int32_t n, uint64_t seed) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < n; i++) if (c[i].val > mx) mx = c[i].val;
    double z = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].val = exp_nonpos(c[i].val - mx);
        z += c[i].val;
    }
    uint64_t state = seed;
    const double u = uniform01(&state) * z;
    double cum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        cum += c[i].val;
        if (u < cum) return c[i].id;
    }
    return c[n - 1].id; /* u landed in the rounding gap at the very end */
}

/* ------------------------------------------------------------------------------------------ */
/* One row                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* A token can be drawn when the bitmask (if any) allows it and its logit is finite. */
static inline bool allowed(const uint32_t *mask, int32_t id, float logit) {
    if (mask && !((mask[id >> 5] >> (id & 31)) & 1u)) return false;
    return isfinite(logit);
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

int32_t pie_sample_row(pie_sampler_scratch *s, const float *logits, int32_t n_vocab,
                       const uint32_t *mask, const pie_sampler *sampler,
                       int32_t *out_token, float *out_logprob,
                       int32_t top_k, int32_t *out_top_ids, float *out_top_probs) {
    if (!s || !logits || !sampler || !out_token || n_vocab <= 0 || n_vocab > s->n_vocab)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "pie_sample_row: bad arguments (n_vocab %d)", n_vocab);
    int32_t st = check_params(sampler, n_vocab, top_k);
    if (st != PIE_OK) return st;
    if (top_k > 0 && (!out_top_ids || !out_top_probs))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "top_k %d requested without output buffers", top_k);

    /* --- choose the token ----------------------------------------------------------------- */
    /* A temperature so small that logit / temperature overflows is greedy in the limit. */
    bool greedy = sampler->temperature <= 0.0f;
    const float inv_t = greedy ? 0.0f : 1.0f / sampler->temperature;
    int32_t token = -1;
    if (greedy) {
        token = mask ? argmax_masked(logits, n_vocab, mask) : argmax_finite(logits, n_vocab);
    } else {
        cand   *c      = s->c;
        int32_t n_cand = 0;
        for (int32_t i = 0; i < n_vocab; i++) {
            if (!allowed(mask, i, logits[i])) continue;
            c[n_cand].val = logits[i] * inv_t;
            c[n_cand].id  = i;
            if (!isfinite(c[n_cand].val)) greedy = true;
            n_cand++;
        }
        if (n_cand > 0 && greedy) { /* scaled values overflowed: compare the raw logits */
            int32_t best = 0;
            for (int32_t i = 1; i < n_cand; i++) if (logits[c[i].id] > logits[c[best].id]) best = i;
            token = c[best].id;
        } else if (n_cand > 0) {
            if (sampler->top_k > 0 && sampler->top_k < n_cand) {
                select_top(c, n_cand, sampler->top_k);
                n_cand = sampler->top_k;
            }
            if (sampler->top_p < 1.0f) n_cand = top_p_prefix(c, n_cand, sampler->top_p);
            if (sampler->min_p > 0.0f) n_cand = min_p_filter(c, n_cand, sampler->min_p);
            token = draw(c, n_cand, sampler->seed);
        }
    }
    if (token < 0)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT,
                             mask ? "the logit mask allows no token with a finite logit"
                                  : "every logit is -inf or NaN");
    *out_token = token;

    /* --- probes over the raw logits (the candidate array is free to reuse now) ------------ */
    if (out_logprob || top_k > 0) {
        float  mx;
        double log_z;
        raw_log_norm(logits, n_vocab, &mx, &log_z);
        if (out_logprob) *out_logprob = raw_logprob(logits, token, mx, log_z);
        if (top_k > 0) {
            cand *c = s->c;
            for (int32_t i = 0; i < n_vocab; i++) {
                c[i].val = isnan(logits[i]) ? -INFINITY : logits[i];
                c[i].id  = i;
            }
            select_top(c, n_vocab, top_k);
            for (int32_t i = 0; i < top_k; i++) {
                out_top_ids[i]   = c[i].id;
                out_top_probs[i] = isfinite(mx) && isfinite(c[i].val)
                                       ? (float)exp((double)c[i].val - mx - log_z) : 0.0f;
            }
        }
    }
    return PIE_OK;
}
