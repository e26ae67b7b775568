/*
 * batch.c — check a pie_batch against the model and the pool, then turn it into graph inputs.
 *
 * Nothing here touches the KV pool: a batch that fails any check leaves every page as it was.
 * The plan lays out, per request, how attention reads its KV (a view of the pool when its pages
 * are consecutive; views of a few runs of consecutive pages joined by concat, e.g. a shared
 * prefix then a fork's own pages; else gathered rows) and one mask row per token over the request's own KV that
 * hides later rows (causality), rows outside its custom BRLE mask, and (in mask_swa) rows that
 * fell out of the sliding window.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define F16_ZERO     ((ggml_fp16_t)0x0000)
#define F16_NEG_INF  ((ggml_fp16_t)0xFC00)

/* Grows *p to hold n elements of size sz; returns false when out of memory. */
static bool grow(void **p, size_t *cap, size_t n, size_t sz) {
    if (n <= *cap) return true;
    size_t want = n + n / 2;
    void *q = realloc(*p, want * sz);
    if (!q) return false;
    *p = q;
    *cap = want;
    return true;
}

/* ------------------------------------------------------------------------------------------ */
/* Validation                                                                                 */
/* ------------------------------------------------------------------------------------------ */

#define BAD(...) pie_set_error(PIE_ERR_INVALID_ARGUMENT, __VA_ARGS__)

/* Per request: its page table, then the KV slots its new tokens take, marked in slot_writer
 * (request + 1); no slot may be taken twice. */
static int32_t mark_writes(pie_model *m, const pie_batch *b) {
    const int32_t ps = m->kv.page_size, np = m->kv.n_pages;
    int64_t n_kv = 0;
    for (int32_t r = 0; r < b->n_requests; r++) {
        const int32_t q0 = b->qo_indptr[r], q1 = b->qo_indptr[r + 1];
        const int32_t p0 = b->kv_page_indptr[r], p1 = b->kv_page_indptr[r + 1];
        const int32_t last = b->kv_last_page_len[r];
        if (last < 1 || last > ps) return BAD("request %d: last_page_len %d outside 1..%d", r, last, ps);
        const int64_t kv_len = (int64_t)(p1 - p0 - 1) * ps + last, n_new = q1 - q0;
        if (kv_len < n_new) return BAD("request %d: KV length %lld is shorter than its %lld new tokens", r, (long long)kv_len, (long long)n_new);
        for (int32_t i = p0; i < p1; i++) {
            const int32_t page = b->kv_page_indices[i];
            if (page < 0 || page >= np) return BAD("request %d: page id %d out of range (n_pages=%d)", r, page, np);
            if (m->plan.page_stamp[page] == r) return BAD("request %d: page %d listed twice", r, page);
            m->plan.page_stamp[page] = r;
        }
        for (int64_t j = kv_len - n_new; j < kv_len; j++) {
            const int64_t slot = (int64_t)b->kv_page_indices[p0 + j / ps] * ps + j % ps;
            if (m->plan.slot_writer[slot])
                return BAD("request %d: KV slot %lld of page %d is written twice in this batch", r, (long long)(j % ps),
                           b->kv_page_indices[p0 + j / ps]);
            m->plan.slot_writer[slot] = r + 1;
            m->plan.marked[m->plan.n_marked++] = slot;
        }
        n_kv += kv_len;
    }
    if (n_kv > m->params.max_batch_kv)
        return BAD("batch attends over %lld KV rows; max_batch_kv is %d", (long long)n_kv, m->params.max_batch_kv);
    return PIE_OK;
}

/* No request reads a KV slot another request of the batch writes: what it would see would
 * depend on the other request (and attention reads KV per request, so it must be its own). */
static int32_t check_reads(pie_model *m, const pie_batch *b) {
    const int32_t ps = m->kv.page_size;
    for (int32_t r = 0; r < b->n_requests; r++) {
        const int32_t *pages = b->kv_page_indices + b->kv_page_indptr[r];
        const int64_t n_old = (int64_t)(b->kv_page_indptr[r + 1] - b->kv_page_indptr[r] - 1) * ps +
                              b->kv_last_page_len[r] - (b->qo_indptr[r + 1] - b->qo_indptr[r]);
        for (int64_t j = 0; j < n_old; j++) {
            const int32_t writer = m->plan.slot_writer[(int64_t)pages[j / ps] * ps + j % ps] - 1;
            if (writer >= 0)
                return BAD("request %d reads KV slot %lld of page %d, which request %d writes in this batch", r,
                           (long long)(j % ps), pages[j / ps], writer);
        }
    }
    return PIE_OK;
}

/* Unmarks the slots mark_writes marked (the array is all zero between batches). */
static void clear_writes(pie_plan *p) {
    for (int32_t i = 0; i < p->n_marked; i++) p->slot_writer[p->marked[i]] = 0;
    p->n_marked = 0;
}

static int32_t check_requests(pie_model *m, const pie_batch *b) {
    const int32_t np = m->kv.n_pages;
    if (b->n_requests < 1) return BAD("batch has %d requests; need at least 1", b->n_requests);
    if (!b->qo_indptr || !b->kv_page_indptr || !b->kv_last_page_len)
        return BAD("qo_indptr, kv_page_indptr and kv_last_page_len are required");
    if (b->qo_indptr[0] != 0) return BAD("qo_indptr[0] is %d; must be 0", b->qo_indptr[0]);
    if (b->kv_page_indptr[0] != 0) return BAD("kv_page_indptr[0] is %d; must be 0", b->kv_page_indptr[0]);
    if (b->qo_indptr[b->n_requests] != b->n_tokens)
        return BAD("qo_indptr ends at %d but the batch has %d tokens", b->qo_indptr[b->n_requests], b->n_tokens);
    if (b->kv_page_indptr[b->n_requests] > 0 && !b->kv_page_indices) return BAD("kv_page_indices is NULL");

    /* indptr arrays first: every later read is bounded by their last entries */
    for (int32_t r = 0; r < b->n_requests; r++) {
        if (b->qo_indptr[r + 1] <= b->qo_indptr[r])
            return BAD("request %d: qo_indptr must increase (%d -> %d); every request needs a token", r,
                       b->qo_indptr[r], b->qo_indptr[r + 1]);
        if (b->kv_page_indptr[r + 1] <= b->kv_page_indptr[r])
            return BAD("request %d: kv_page_indptr must increase (%d -> %d); every request needs a page", r,
                       b->kv_page_indptr[r], b->kv_page_indptr[r + 1]);
    }

    for (int32_t p = 0; p < np; p++) m->plan.page_stamp[p] = -1;
    int32_t st = mark_writes(m, b);
    if (st == PIE_OK) st = check_reads(m, b);
    clear_writes(&m->plan);
    return st;
}

/* Mask run sums are checked while the plan fills each row (they need the request's KV length). */
static int32_t check_masks(const pie_batch *b) {
    if (!b->mask_indptr) return PIE_OK;
    if (b->mask_indptr[0] != 0) return BAD("mask_indptr[0] is %d; must be 0", b->mask_indptr[0]);
    for (int32_t t = 0; t < b->n_tokens; t++)
        if (b->mask_indptr[t + 1] < b->mask_indptr[t])
            return BAD("token %d: mask_indptr decreases (%d -> %d)", t, b->mask_indptr[t], b->mask_indptr[t + 1]);
    if (b->mask_indptr[b->n_tokens] > 0 && !b->mask_runs) return BAD("mask_runs is NULL");
    return PIE_OK;
}

static int32_t check_outputs(const pie_model *m, const pie_batch *b) {
    const int32_t n = b->n_outputs;
    if (n < 0) return BAD("n_outputs is %d", n);
    if (n > m->params.max_batch_tokens) return BAD("batch has %d outputs; max_batch_tokens is %d", n, m->params.max_batch_tokens);
    if (n == 0) return PIE_OK;
    const uint32_t f = b->return_flags;
    const bool hidden_only = f & PIE_RETURN_HIDDEN_ONLY;
    if (hidden_only && (f != (PIE_RETURN_HIDDEN | PIE_RETURN_HIDDEN_ONLY) || b->logit_masks))
        return BAD("PIE_RETURN_HIDDEN_ONLY goes with PIE_RETURN_HIDDEN alone (no other flag, no logit_masks)");
    if (!b->output_rows) return BAD("output_rows is required when n_outputs > 0");
    if (!hidden_only && (!b->samplers || !b->out_tokens))
        return BAD("output_rows, samplers and out_tokens are required when n_outputs > 0");
    for (int32_t i = 0; i < n; i++) {
        if (b->output_rows[i] < 0 || b->output_rows[i] >= b->n_tokens)
            return BAD("output %d: row %d out of range (batch has %d tokens)", i, b->output_rows[i], b->n_tokens);
        if (hidden_only) continue;
        const pie_sampler *s = &b->samplers[i];
        if (!isfinite(s->temperature)) return BAD("output %d: sampler temperature must be finite (got %g)", i, s->temperature);
        if (s->top_k < 0) return BAD("output %d: sampler top_k must be >= 0 (got %d)", i, s->top_k);
        if (!(s->top_p > 0.0f && s->top_p <= 1.0f)) return BAD("output %d: sampler top_p must be in (0, 1] (got %g)", i, s->top_p);
        if (!(s->min_p >= 0.0f && s->min_p <= 1.0f)) return BAD("output %d: sampler min_p must be in [0, 1] (got %g)", i, s->min_p);
    }
    if (f & ~(uint32_t)(PIE_RETURN_LOGPROB | PIE_RETURN_TOP_K | PIE_RETURN_LOGITS | PIE_RETURN_HIDDEN |
                        PIE_RETURN_HIDDEN_ONLY))
        return BAD("unknown return_flags bits 0x%x", f);
    if ((f & PIE_RETURN_LOGPROB) && !b->out_logprobs) return BAD("PIE_RETURN_LOGPROB needs out_logprobs");
    if ((f & PIE_RETURN_LOGITS) && !b->out_logits) return BAD("PIE_RETURN_LOGITS needs out_logits");
    if ((f & PIE_RETURN_HIDDEN) && !b->out_hidden) return BAD("PIE_RETURN_HIDDEN needs out_hidden");
    if (f & PIE_RETURN_TOP_K) {
        if (b->top_k < 1 || b->top_k > m->hp.n_vocab) return BAD("top_k %d outside 1..%d", b->top_k, m->hp.n_vocab);
        if (!b->out_top_ids || !b->out_top_probs) return BAD("PIE_RETURN_TOP_K needs out_top_ids and out_top_probs");
    }
    if (b->logit_masks) {
        const int32_t words = (m->hp.n_vocab + 31) / 32;
        const uint32_t tail = m->hp.n_vocab % 32 ? (1u << (m->hp.n_vocab % 32)) - 1u : 0xFFFFFFFFu;
        for (int32_t i = 0; i < n; i++) {
            const uint32_t *row = b->logit_masks + (size_t)i * words;
            uint32_t any = 0;
            for (int32_t w = 0; w < words - 1 && !any; w++) any |= row[w];
            if (!any && !(row[words - 1] & tail)) return BAD("output %d: the logit mask allows no token", i);
        }
    }
    return PIE_OK;
}

/* An embedding model (PIE_NON_CAUSAL): each request's whole input in this one pass (bidirectional
 * attention: earlier KV would not have seen these tokens), hidden states only (no LM head), and
 * positions inside its position table. */
static int32_t check_encoder(const pie_model *m, const pie_batch *b) {
    const pie_hparams *hp = &m->hp;
    for (int32_t t = 0; hp->n_pos > 0 && t < b->n_tokens; t++)
        if (b->positions[t] >= hp->n_pos)
            return BAD("token %d: position %d is past the model's %d position embeddings", t, b->positions[t], hp->n_pos);
    if (!(hp->arch->needs & PIE_NON_CAUSAL)) return PIE_OK;
    if (b->n_outputs > 0 && !(b->return_flags & PIE_RETURN_HIDDEN_ONLY))
        return pie_set_error(PIE_ERR_UNSUPPORTED, "%s is an embedding model: it has no LM head, so it cannot sample or "
                             "score tokens; only hidden states can be computed (PIE_RETURN_HIDDEN_ONLY)", hp->arch->name);
    const int32_t ps = m->kv.page_size;
    for (int32_t r = 0; r < b->n_requests; r++) {
        const int64_t kv_len = (int64_t)(b->kv_page_indptr[r + 1] - b->kv_page_indptr[r] - 1) * ps + b->kv_last_page_len[r];
        const int32_t n_new = b->qo_indptr[r + 1] - b->qo_indptr[r];
        if (kv_len != n_new)
            return BAD("request %d: %s attends both ways, so a request brings its whole input in one pass (KV length "
                       "%lld, %d new tokens)", r, hp->arch->name, (long long)kv_len, n_new);
    }
    return PIE_OK;
}

static int32_t validate(pie_model *m, const pie_batch *b) {
    if (!b) return BAD("batch is NULL");
    if (b->n_tokens < 1) return BAD("batch has no tokens");
    if (b->n_tokens > m->params.max_batch_tokens)
        return BAD("batch has %d tokens; max_batch_tokens is %d", b->n_tokens, m->params.max_batch_tokens);
    if (!b->tokens || !b->positions) return BAD("tokens and positions are required");
    for (int32_t t = 0; t < b->n_tokens; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= m->hp.n_vocab)
            return BAD("token %d: id %d out of range (n_vocab=%d)", t, b->tokens[t], m->hp.n_vocab);
        if (b->positions[t] < 0) return BAD("token %d: negative position %d", t, b->positions[t]);
    }
    int32_t st;
    if ((st = check_requests(m, b)) || (st = check_masks(b)) || (st = check_outputs(m, b)) ||
        (st = check_encoder(m, b)))
        return st;
    return PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Plan                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Whether a mask row lets the token see anything: a row that hides every KV row would make
 * attention average nothing (ggml returns zeros without a word). */
static bool any_visible(const ggml_fp16_t *row, int64_t kv_len) {
    for (int64_t j = 0; j < kv_len; j++)
        if (row[j] == F16_ZERO) return true;
    return false;
}

/* Fills token t's mask row over its request's KV (kv_len entries); `own` is the token's own
 * KV index. Checks the BRLE runs, and that they leave the token something to attend to (without
 * custom runs it always sees itself). A bidirectional model (PIE_NON_CAUSAL) sees later rows too,
 * and its sliding window reaches window / 2 rows to each side (llama.cpp's symmetric window). */
static int32_t fill_mask_row(ggml_fp16_t *row, ggml_fp16_t *row_swa, int64_t kv_len, int64_t own, bool causal,
                             const int32_t *runs, int32_t n_runs, int32_t window, int32_t t, bool *swa_hides) {
    for (int64_t j = 0; j < kv_len; j++) row[j] = j <= own || !causal ? F16_ZERO : F16_NEG_INF;
    if (n_runs > 0) {
        int64_t j = 0;
        for (int32_t k = 0; k < n_runs; k++) {
            if (runs[k] < 0) return BAD("token %d: mask run %d is negative (%d)", t, k, runs[k]);
            const int64_t end = j + runs[k];
            if (k % 2 == 0)
                for (int64_t x = j; x < end && x < kv_len; x++) row[x] = F16_NEG_INF;
            j = end;
        }
        if (j != kv_len)
            return BAD("token %d: mask runs sum to %lld but the request's KV length is %lld", t, (long long)j, (long long)kv_len);
        if (!any_visible(row, kv_len)) return BAD("token %d: its mask hides every KV row, its own included", t);
    }
    if (row_swa) {
        memcpy(row_swa, row, sizeof(ggml_fp16_t) * (size_t)kv_len);
        const int64_t before = causal ? own - window + 1 : own - window / 2; /* rows < before are out */
        for (int64_t j = 0; j < before && j < kv_len; j++) {
            if (row_swa[j] != F16_NEG_INF) *swa_hides = true;
            row_swa[j] = F16_NEG_INF;
        }
        for (int64_t j = own + window / 2 + 1; !causal && j < kv_len; j++) {
            if (row_swa[j] != F16_NEG_INF) *swa_hides = true;
            row_swa[j] = F16_NEG_INF;
        }
        if (n_runs > 0 && !any_visible(row_swa, kv_len))
            return BAD("token %d: its mask hides every KV row inside the sliding window of %d", t, window);
    }
    return PIE_OK;
}

/* Appends rows start .. start + len of request req to a layout (joining a span of the same kind
 * that ends there; a wide one only when it is the same request's); false when out of memory. */
static bool layout_add(pie_layout *l, int32_t start, int32_t len, bool wide, int32_t req) {
    pie_span *last = l->n_spans > 0 ? &l->spans[l->n_spans - 1] : NULL;
    if (last && last->wide == wide && last->start + last->len == start && (!wide || last->req == req)) {
        last->len += len;
        last->req = req;
        return true;
    }
    if (!grow((void **)&l->spans, &l->cap, (size_t)l->n_spans + 1, sizeof(pie_span))) return false;
    l->spans[l->n_spans++] = (pie_span){ .start = start, .len = len, .wide = wide, .req = req };
    return true;
}

/* The most products one weight takes over a layout's rows (pie_matmul splits narrow spans into
 * pieces of split_cols columns), for sizing graphs. */
static int32_t layout_pieces(const pie_layout *l, int32_t split_cols) {
    int32_t n = 0;
    for (int32_t i = 0; split_cols > 0 && i < l->n_spans; i++)
        n += l->spans[i].wide ? 1 : (l->spans[i].len + split_cols - 1) / split_cols;
    return n;
}

/* Which kernel family each row's products take (see PIE_WIDE_ROWS): the batch's rows by the
 * size of their request, the sampled rows by how many rows their request samples. */
static int32_t plan_layouts(pie_plan *p, const pie_batch *b, int32_t split_cols) {
    pie_layout *tl = &p->token_layout, *ol = &p->output_layout;
    tl->n_spans = ol->n_spans = 0;
    bool ok = true;
    for (int32_t r = 0; r < b->n_requests && ok; r++)
        ok = layout_add(tl, p->reqs[r].q0, p->reqs[r].n_q, p->reqs[r].n_q >= PIE_WIDE_ROWS, r);
    if (ok && b->n_outputs == 0) ok = layout_add(ol, 0, 1, false, 0); /* the dummy row */
    if (ok && b->n_outputs > 0) {
        ok = grow((void **)&p->out_req, &p->cap_out_req, (size_t)b->n_outputs, sizeof(int32_t)) &&
             grow((void **)&p->req_outputs, &p->cap_req_outputs, (size_t)b->n_requests, sizeof(int32_t));
        if (ok) {
            memset(p->req_outputs, 0, sizeof(int32_t) * (size_t)b->n_requests);
            for (int32_t i = 0; i < b->n_outputs; i++) { /* the request owning the row: binary search */
                int32_t lo = 0, hi = b->n_requests - 1;
                while (lo < hi) {
                    const int32_t mid = (lo + hi + 1) / 2;
                    if (b->qo_indptr[mid] <= b->output_rows[i]) lo = mid;
                    else hi = mid - 1;
                }
                p->out_req[i] = lo;
                p->req_outputs[lo]++;
            }
            for (int32_t i = 0; i < b->n_outputs && ok; i++)
                ok = layout_add(ol, i, 1, p->req_outputs[p->out_req[i]] >= PIE_WIDE_ROWS, p->out_req[i]);
        }
    }
    if (!ok) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate the batch's row layout");
    tl->n_pieces = layout_pieces(tl, split_cols);
    ol->n_pieces = layout_pieces(ol, split_cols);
    return PIE_OK;
}

/* Each token's Q scale for attention temperature (hp->attn_temp_scale), computed as llama.cpp
 * computes it (in double, from the float position), so both engines scale by the same floats. */
static int32_t plan_attn_temp(pie_plan *p, const pie_hparams *hp, const pie_batch *b) {
    if (hp->attn_temp_scale == 0.0f) return PIE_OK;
    if (!grow((void **)&p->attn_temp, &p->cap_attn_temp, (size_t)b->n_tokens, sizeof(float)))
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot grow batch scratch");
    for (int32_t t = 0; t < b->n_tokens; t++) {
        const float pos = (float)b->positions[t];
        p->attn_temp[t] = (float)(log(floor(pos / (float)hp->attn_temp_floor) + 1.0) * hp->attn_temp_scale + 1.0);
    }
    return PIE_OK;
}

/* A member's mask row over its own KV (kv_len rows: the group's shared rows, then its own) spread
 * over its group's KV (n_kv rows): the shared rows in place, its own at `off`, the other members'
 * rows hidden. */
static void spread_row(ggml_fp16_t *dst, const ggml_fp16_t *row, int64_t n_kv, int64_t shared, int64_t off, int64_t kv_len) {
    for (int64_t j = 0; j < n_kv; j++) dst[j] = F16_NEG_INF;
    memcpy(dst, row, sizeof(ggml_fp16_t) * (size_t)shared);
    memcpy(dst + off, row + shared, sizeof(ggml_fp16_t) * (size_t)(kv_len - shared));
}

int32_t pie_plan_build(pie_model *m, const pie_batch *b) {
    pie_plan *p = &m->plan;
    int32_t st = validate(m, b);
    if (st != PIE_OK) return st;

    const int32_t ps = m->kv.page_size, nt = b->n_tokens, nr = b->n_requests;
    const int32_t n_out = b->n_outputs > 0 ? b->n_outputs : 1;
    const bool swa = m->hp.sliding_window > 0, causal = !(m->hp.arch->needs & PIE_NON_CAUSAL);
    if (!grow((void **)&p->reqs, &p->cap_reqs, (size_t)nr, sizeof(pie_plan_req)) ||
        !grow((void **)&p->write_rows, &p->cap_tokens, (size_t)nt, sizeof(int64_t)) ||
        !grow((void **)&p->out_rows, &p->cap_out, (size_t)n_out, sizeof(int32_t)))
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot grow batch scratch");

    /* each request's KV as runs of consecutive pages, and the row its new tokens write */
    int32_t n_req_runs = 0;
    for (int32_t r = 0; r < nr; r++) {
        const int32_t n_pages = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
        n_req_runs += n_pages; /* at most one run per page */
    }
    if (!grow((void **)&p->req_runs, &p->cap_req_runs, (size_t)n_req_runs, sizeof(pie_kv_run)))
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot grow batch scratch");
    n_req_runs = 0;
    for (int32_t r = 0; r < nr; r++) {
        pie_plan_req *q = &p->reqs[r];
        const int32_t *pages = b->kv_page_indices + b->kv_page_indptr[r];
        const int32_t n_pages = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
        q->q0 = b->qo_indptr[r];
        q->n_q = b->qo_indptr[r + 1] - q->q0;
        q->n_kv = (n_pages - 1) * ps + b->kv_last_page_len[r];
        q->run_off = n_req_runs;
        pie_kv_run *run = p->req_runs + q->run_off;
        int32_t k = -1;
        for (int32_t i = 0; i * ps < q->n_kv; i++) {
            const int32_t len = q->n_kv - i * ps < ps ? q->n_kv - i * ps : ps; /* the last page is partial */
            if (k >= 0 && pages[i] == pages[i - 1] + 1) {
                run[k].len += len;
            } else {
                run[++k].start = pages[i] * ps;
                run[k].len = len;
            }
        }
        q->n_runs = k + 1;
        n_req_runs += q->n_runs;
        for (int32_t i = 0; i < q->n_q; i++) {
            const int64_t own = q->n_kv - q->n_q + i;
            p->write_rows[q->q0 + i] = (int64_t)pages[own / ps] * ps + own % ps;
        }
    }

    /* attention groups (see pie_plan_group): consecutive decode-sized requests whose first runs
     * start at the same pool row and share at least a page */
    if (!grow((void **)&p->groups, &p->cap_groups, (size_t)nr, sizeof(pie_plan_group)))
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot grow batch scratch");
    int32_t ng = 0, widest = 0;
    int64_t n_mask = 0, n_gather = 0, n_runs = 0;
    for (int32_t r = 0; r < nr;) {
        const pie_plan_req *q = &p->reqs[r];
        const pie_kv_run *first = &p->req_runs[q->run_off];
        int32_t end = r + 1, rows = q->n_q, shared = first->len;
        const bool groupable = causal && q->n_q < PIE_WIDE_ROWS && q->n_runs <= PIE_MAX_MEMBER_RUNS;
        while (groupable && end < nr) {
            const pie_plan_req *n = &p->reqs[end];
            const pie_kv_run *c = &p->req_runs[n->run_off];
            const int32_t common = first->len < c->len ? first->len : c->len;
            if (n->n_q >= PIE_WIDE_ROWS || n->n_runs > PIE_MAX_MEMBER_RUNS || rows + n->n_q > PIE_GROUP_ROWS ||
                c->start != first->start || common < ps)
                break;
            if (common < shared) shared = common;
            rows += n->n_q;
            end++;
        }
        pie_plan_group *gr = &p->groups[ng++];
        *gr = (pie_plan_group){ .r0 = r, .n_req = end - r, .q0 = q->q0, .n_q = rows, .run_off = (int32_t)n_runs,
                                .gather_off = (int32_t)n_gather };
        if (gr->n_req == 1) { /* alone: its own runs, or gathered rows when they are too many */
            gr->n_kv = q->n_kv;
            gr->n_runs = q->n_runs <= PIE_MAX_KV_RUNS ? q->n_runs : 0;
            gr->pad = q->n_q == 1 && q->n_kv >= PIE_SPLIT_KV_ROWS;
            if (gr->n_runs == 0) n_gather += q->n_kv;
        } else { /* the shared rows once, then each member's own: the rest of its first run, its other runs */
            gr->shared = shared;
            gr->n_kv = shared;
            gr->n_runs = 1;
            for (int32_t i = r; i < end; i++) {
                const pie_plan_req *m = &p->reqs[i];
                gr->n_kv += m->n_kv - shared;
                gr->n_runs += m->n_runs - (p->req_runs[m->run_off].len == shared);
            }
        }
        if (gr->n_kv > widest) widest = gr->n_kv;
        n_runs += gr->n_runs;
        gr->mask_off = n_mask;
        n_mask += (int64_t)(gr->n_q + gr->pad) * gr->n_kv;
        r = end;
    }
    if (!grow((void **)&p->runs, &p->cap_runs, (size_t)n_runs, sizeof(pie_kv_run)) ||
        !grow((void **)&p->gather_rows, &p->cap_gather, (size_t)n_gather, sizeof(int32_t)) ||
        !grow((void **)&p->mask, &p->cap_mask, (size_t)n_mask, sizeof(ggml_fp16_t)) ||
        (swa && !grow((void **)&p->mask_swa, &p->cap_mask_swa, (size_t)n_mask, sizeof(ggml_fp16_t))) ||
        !grow((void **)&p->row, &p->cap_row, (size_t)widest, sizeof(ggml_fp16_t)) ||
        !grow((void **)&p->row_swa, &p->cap_row_swa, (size_t)widest, sizeof(ggml_fp16_t)))
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate attention masks (%lld entries)", (long long)n_mask);
    p->n_tokens = nt;
    p->n_requests = nr;
    p->n_groups = ng;
    p->n_outputs = n_out;
    p->head = b->n_outputs > 0 && !(b->return_flags & PIE_RETURN_HIDDEN_ONLY);
    p->n_runs = (int32_t)n_runs;
    p->n_gather = (int32_t)n_gather;
    p->n_mask = n_mask;
    p->any_swa_mask = false;

    /* each group's runs (or gathered rows) and mask rows */
    for (int32_t gi = 0; gi < ng; gi++) {
        const pie_plan_group *gr = &p->groups[gi];
        pie_kv_run *run = p->runs + gr->run_off;
        int64_t off = gr->shared; /* where the next member's own rows start in the group's KV */
        if (gr->n_req > 1) *run++ = (pie_kv_run){ .start = p->req_runs[p->reqs[gr->r0].run_off].start, .len = gr->shared };
        for (int32_t r = gr->r0; r < gr->r0 + gr->n_req; r++) {
            const pie_plan_req *q = &p->reqs[r];
            const pie_kv_run *own = p->req_runs + q->run_off;
            if (gr->n_req == 1 && gr->n_runs == 0) {
                const int32_t *pages = b->kv_page_indices + b->kv_page_indptr[r];
                for (int64_t j = 0; j < q->n_kv; j++) p->gather_rows[gr->gather_off + j] = pages[j / ps] * ps + (int32_t)(j % ps);
            } else if (gr->n_req == 1) {
                memcpy(run, own, sizeof(pie_kv_run) * (size_t)q->n_runs);
            } else {
                if (own[0].len > gr->shared) *run++ = (pie_kv_run){ .start = own[0].start + gr->shared, .len = own[0].len - gr->shared };
                for (int32_t k = 1; k < q->n_runs; k++) *run++ = own[k];
            }
            for (int32_t i = 0; i < q->n_q; i++) {
                const int32_t t = q->q0 + i;
                const int64_t own_row = q->n_kv - q->n_q + i;
                const int32_t *mruns = NULL;
                int32_t n_mruns = 0;
                if (b->mask_indptr) {
                    mruns = b->mask_runs + b->mask_indptr[t];
                    n_mruns = b->mask_indptr[t + 1] - b->mask_indptr[t];
                }
                const int64_t at = gr->mask_off + (int64_t)(t - gr->q0) * gr->n_kv;
                ggml_fp16_t *row = gr->n_req == 1 ? p->mask + at : p->row;
                ggml_fp16_t *row_swa = !swa ? NULL : gr->n_req == 1 ? p->mask_swa + at : p->row_swa;
                st = fill_mask_row(row, row_swa, q->n_kv, own_row, causal, mruns, n_mruns, m->hp.sliding_window, t,
                                   &p->any_swa_mask);
                if (st != PIE_OK) return st;
                if (gr->n_req > 1) spread_row(p->mask + at, row, gr->n_kv, gr->shared, off, q->n_kv);
                if (gr->n_req > 1 && swa) spread_row(p->mask_swa + at, row_swa, gr->n_kv, gr->shared, off, q->n_kv);
            }
            off += q->n_kv - gr->shared;
        }
        if (gr->pad) { /* the dummy row sees only the query's own row, which its mask row shows too */
            const int64_t at = gr->mask_off + (int64_t)gr->n_kv;
            for (int64_t j = 0; j < gr->n_kv; j++) p->mask[at + j] = j == gr->n_kv - 1 ? F16_ZERO : F16_NEG_INF;
            if (swa) memcpy(p->mask_swa + at, p->mask + at, sizeof(ggml_fp16_t) * (size_t)gr->n_kv);
        }
    }
    if (b->n_outputs > 0) memcpy(p->out_rows, b->output_rows, sizeof(int32_t) * (size_t)b->n_outputs);
    else p->out_rows[0] = nt - 1; /* nothing to sample: run the head on one row and discard it */
    if ((st = plan_attn_temp(p, &m->hp, b)) != PIE_OK) return st;
    return plan_layouts(p, b, m->split_cols);
}

void pie_plan_free(pie_plan *p) {
    free(p->write_rows);
    free(p->reqs);
    free(p->runs);
    free(p->req_runs);
    free(p->groups);
    free(p->row);
    free(p->row_swa);
    free(p->gather_rows);
    free(p->mask);
    free(p->mask_swa);
    free(p->out_rows);
    free(p->token_layout.spans);
    free(p->output_layout.spans);
    free(p->out_req);
    free(p->req_outputs);
    free(p->zeros);
    free(p->attn_temp);
    free(p->page_stamp);
    free(p->slot_writer);
    free(p->marked);
    memset(p, 0, sizeof(*p));
}
