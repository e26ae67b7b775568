/*
 * kv_pool.c — the paged KV cache: per layer one flat K and one flat V tensor whose rows are
 * page * page_size + offset. The caller owns page ids; these functions only move page contents.
 *
 * Host layout of one page (pie_read_pages / pie_write_pages), layer after layer:
 *   K rows [page_size][k row bytes], then V rows [page_size][v row bytes].
 */
#include "internal.h"

#include "ggml-alloc.h"

#include <stdlib.h>
#include <string.h>

int32_t pie_kv_init(pie_model *m) {
    pie_kv_pool *kv = &m->kv;
    const pie_hparams *hp = &m->hp;
    kv->page_size = m->params.page_size;
    kv->n_pages   = m->params.n_pages;
    kv->type      = m->params.kv_type == PIE_KV_Q8_0 ? GGML_TYPE_Q8_0 : GGML_TYPE_F16;

    const int64_t k_width = (int64_t)hp->head_dim * hp->n_head_kv;   /* row of K          */
    const int64_t v_width = (int64_t)hp->head_dim_v * hp->n_head_kv; /* row of V          */
    const int64_t rows    = (int64_t)kv->page_size * kv->n_pages;
    /* attention views one head at a time, so each head must hold whole q8_0 blocks */
    if (kv->type == GGML_TYPE_Q8_0 && (hp->head_dim % ggml_blck_size(kv->type) || hp->head_dim_v % ggml_blck_size(kv->type)))
        return pie_set_error(PIE_ERR_UNSUPPORTED, "q8_0 KV needs head sizes that are multiples of 32 (got %d and %d); use f16",
                             hp->head_dim, hp->head_dim_v);

    struct ggml_init_params ip = {
        .mem_size = ggml_tensor_overhead() * 2 * (size_t)hp->n_layer, .mem_buffer = NULL, .no_alloc = true };
    kv->ctx = ggml_init(ip);
    if (!kv->ctx) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot create the KV context");
    for (int il = 0; il < hp->n_layer; il++) {
        kv->k[il] = ggml_new_tensor_2d(kv->ctx, kv->type, k_width, rows); /* [k_width, rows] */
        kv->v[il] = ggml_new_tensor_2d(kv->ctx, kv->type, v_width, rows); /* [v_width, rows] */
        ggml_format_name(kv->k[il], "cache_k_l%d", il);
        ggml_format_name(kv->v[il], "cache_v_l%d", il);
    }
    ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(m->dev);
    kv->buffer = ggml_backend_alloc_ctx_tensors_from_buft(kv->ctx, buft);
    if (!kv->buffer)
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of KV pool (%d pages of %d tokens) on %s",
                             ggml_backend_alloc_ctx_tensors_from_buft_size(kv->ctx, buft) / 1048576.0,
                             kv->n_pages, kv->page_size, ggml_backend_dev_name(m->dev));
    ggml_backend_buffer_set_usage(kv->buffer, GGML_BACKEND_BUFFER_USAGE_COMPUTE);
    /* Attention only reads rows its request has written, so zeroing is hygiene: done on device
     * memory (cheap), skipped on the host, where touching the pool would commit all of it up
     * front instead of page by page as it fills. */
    if (!ggml_backend_buffer_is_host(kv->buffer)) ggml_backend_buffer_clear(kv->buffer, 0);

    kv->page_bytes = 0;
    for (int il = 0; il < hp->n_layer; il++)
        kv->page_bytes += (size_t)kv->page_size * (kv->k[il]->nb[1] + kv->v[il]->nb[1]);
    kv->total_bytes = (int64_t)kv->page_bytes * kv->n_pages;
    kv->staging = malloc(kv->page_bytes);
    if (!kv->staging) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes of page staging", kv->page_bytes);
    return PIE_OK;
}

void pie_kv_free(pie_kv_pool *kv) {
    if (kv->buffer) ggml_backend_buffer_free(kv->buffer);
    if (kv->ctx) ggml_free(kv->ctx);
    free(kv->staging);
    memset(kv, 0, sizeof(*kv));
}

/* ------------------------------------------------------------------------------------------ */
/* Page transfer                                                                              */
/* ------------------------------------------------------------------------------------------ */

static int32_t check_pages(const pie_kv_pool *kv, int32_t n, const int32_t *pages, const char *what) {
    if (n < 0) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "negative page count %d", n);
    if (n > 0 && !pages) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "%s page list is NULL", what);
    for (int32_t i = 0; i < n; i++)
        if (pages[i] < 0 || pages[i] >= kv->n_pages)
            return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "%s page %d: id %d out of range (n_pages=%d)", what, i,
                                 pages[i], kv->n_pages);
    return PIE_OK;
}

/* Copies one page between host memory and the pool; to_host picks the direction. */
static void transfer_page(pie_model *m, int32_t page, uint8_t *host, bool to_host) {
    pie_kv_pool *kv = &m->kv;
    for (int il = 0; il < m->hp.n_layer; il++) {
        struct ggml_tensor *ts[2] = { kv->k[il], kv->v[il] };
        for (int j = 0; j < 2; j++) {
            size_t nb = ts[j]->nb[1] * (size_t)kv->page_size;
            size_t off = nb * (size_t)page;
            if (to_host) ggml_backend_tensor_get(ts[j], host, off, nb);
            else         ggml_backend_tensor_set(ts[j], host, off, nb);
            host += nb;
        }
    }
}

int32_t pie_copy_pages(pie_model *m, int32_t n, const int32_t *src, const int32_t *dst) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    int32_t st;
    if ((st = check_pages(&m->kv, n, src, "source")) || (st = check_pages(&m->kv, n, dst, "destination"))) return st;
    for (int32_t i = 0; i < n; i++) {
        if (src[i] == dst[i]) continue;
        transfer_page(m, src[i], m->kv.staging, true);
        transfer_page(m, dst[i], m->kv.staging, false);
    }
    return PIE_OK;
}

int32_t pie_read_pages(pie_model *m, int32_t n, const int32_t *pages, void *dst, size_t dst_bytes) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    int32_t st = check_pages(&m->kv, n, pages, "read");
    if (st) return st;
    size_t need = (size_t)n * m->kv.page_bytes;
    if (need > 0 && (!dst || dst_bytes < need))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "read of %d pages needs %zu bytes; the buffer has %zu", n, need, dst ? dst_bytes : 0);
    for (int32_t i = 0; i < n; i++) transfer_page(m, pages[i], (uint8_t *)dst + (size_t)i * m->kv.page_bytes, true);
    return PIE_OK;
}

int32_t pie_write_pages(pie_model *m, int32_t n, const int32_t *pages, const void *src, size_t src_bytes) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    int32_t st = check_pages(&m->kv, n, pages, "write");
    if (st) return st;
    size_t need = (size_t)n * m->kv.page_bytes;
    if (need > 0 && (!src || src_bytes != need))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "write of %d pages needs exactly %zu bytes; got %zu", n, need, src ? src_bytes : 0);
    for (int32_t i = 0; i < n; i++) transfer_page(m, pages[i], (uint8_t *)src + (size_t)i * m->kv.page_bytes, false);
    return PIE_OK;
}
