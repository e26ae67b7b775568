/*
 * kv_pool.c — the paged KV cache: per layer one flat K and one flat V tensor whose rows are
 * page * page_size + offset. The caller owns page ids; these functions only move page contents.
 * Only layers that own KV have tensors (hp.n_layer_kv: gemma3n's last layers read earlier ones').
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

    const int n_kv = hp->n_layer_kv;
    struct ggml_init_params ip = {
        .mem_size = ggml_tensor_overhead() * 2 * (size_t)n_kv, .mem_buffer = NULL, .no_alloc = true };
    kv->ctx = ggml_init(ip);
    if (!kv->ctx) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot create the KV context");
    for (int il = 0; il < n_kv; il++) {
        kv->k[il] = ggml_new_tensor_2d(kv->ctx, kv->type, k_width, rows); /* [k_width, rows] */
        kv->v[il] = ggml_new_tensor_2d(kv->ctx, kv->type, v_width, rows); /* [v_width, rows] */
        ggml_format_name(kv->k[il], "cache_k_l%d", il);
        ggml_format_name(kv->v[il], "cache_v_l%d", il);
    }
    /* each layer's K and V on its layer's device (placement.c) */
    struct ggml_tensor *ts[2 * PIE_MAX_LAYERS];
    int dev[2 * PIE_MAX_LAYERS];
    for (int il = 0; il < n_kv; il++) {
        ts[2 * il] = kv->k[il];
        ts[2 * il + 1] = kv->v[il];
        dev[2 * il] = dev[2 * il + 1] = m->place.layer_dev[il];
    }
    const int first_buf = m->place.n_buf;
    int32_t st = pie_alloc_on_devices(m, ts, dev, 2 * n_kv, GGML_BACKEND_BUFFER_USAGE_COMPUTE);
    if (st != PIE_OK) return st;
    /* Attention only reads rows its request has written, so zeroing is hygiene: done on device
     * memory (cheap), skipped on the host, where touching the pool would commit all of it up
     * front instead of page by page as it fills. */
    for (int i = first_buf; i < m->place.n_buf; i++)
        if (!ggml_backend_buffer_is_host(m->place.buf[i])) ggml_backend_buffer_clear(m->place.buf[i], 0);

    kv->page_bytes = 0;
    for (int il = 0; il < n_kv; il++)
        kv->page_bytes += (size_t)kv->page_size * (kv->k[il]->nb[1] + kv->v[il]->nb[1]);
    kv->total_bytes = (int64_t)kv->page_bytes * kv->n_pages;
    return PIE_OK;
}

/* The pool's buffers belong to the placement (pie_devices_close frees them first). */
void pie_kv_free(pie_kv_pool *kv) {
    if (kv->ctx) ggml_free(kv->ctx);
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
    for (int il = 0; il < m->hp.n_layer_kv; il++) {
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

/* A view of rows row0 .. row0 + n of pool tensor t, bound to t's buffer. */
static struct ggml_tensor *rows_view(struct ggml_context *ctx, struct ggml_tensor *t, int64_t row0, int64_t n) {
    struct ggml_tensor *v = ggml_view_2d(ctx, t, t->ne[0], n, t->nb[1], (size_t)row0 * t->nb[1]); /* [ne0, n] */
    ggml_backend_view_init(v);
    return v;
}

/* Copies page src to page dst layer by layer on the device that holds the layer: ggml copies
 * between two views of one buffer inside it (a device copy, or a worker-side one over RPC). */
static int32_t copy_page(pie_model *m, int32_t src, int32_t dst) {
    pie_kv_pool *kv = &m->kv;
    struct ggml_init_params ip = { .mem_size = 4 * (size_t)m->hp.n_layer_kv * ggml_tensor_overhead(), .mem_buffer = NULL, .no_alloc = true };
    struct ggml_context *ctx = ggml_init(ip);
    if (!ctx) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot create views for a page copy");
    const int64_t ps = kv->page_size;
    for (int il = 0; il < m->hp.n_layer_kv; il++) {
        struct ggml_tensor *ts[2] = { kv->k[il], kv->v[il] };
        for (int j = 0; j < 2; j++)
            ggml_backend_tensor_copy(rows_view(ctx, ts[j], (int64_t)src * ps, ps), rows_view(ctx, ts[j], (int64_t)dst * ps, ps));
    }
    ggml_free(ctx);
    return PIE_OK;
}

/* One page operation, run through pie_rpc_call (a helper thread when workers hold layers). */
typedef struct {
    pie_model *m;
    int32_t n;
    const int32_t *pages, *dst_pages; /* dst_pages: copies only                              */
    uint8_t *host;                     /* reads and writes: n * page_bytes                    */
    bool to_host;
} page_op;

static int32_t run_page_op(void *p) {
    const page_op *op = p;
    int32_t st = PIE_OK;
    for (int32_t i = 0; i < op->n && st == PIE_OK; i++) {
        if (op->dst_pages) {
            if (op->pages[i] != op->dst_pages[i]) st = copy_page(op->m, op->pages[i], op->dst_pages[i]);
        } else {
            transfer_page(op->m, op->pages[i], op->host + (size_t)i * op->m->kv.page_bytes, op->to_host);
        }
    }
    return st;
}

int32_t pie_copy_pages(pie_model *m, int32_t n, const int32_t *src, const int32_t *dst) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    int32_t st;
    if ((st = check_pages(&m->kv, n, src, "source")) || (st = check_pages(&m->kv, n, dst, "destination"))) return st;
    page_op op = { .m = m, .n = n, .pages = src, .dst_pages = dst };
    return pie_rpc_call(&m->place.rpc, run_page_op, &op);
}

int32_t pie_read_pages(pie_model *m, int32_t n, const int32_t *pages, void *dst, size_t dst_bytes) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    int32_t st = check_pages(&m->kv, n, pages, "read");
    if (st) return st;
    size_t need = (size_t)n * m->kv.page_bytes;
    if (need > 0 && (!dst || dst_bytes < need))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "read of %d pages needs %zu bytes; the buffer has %zu", n, need, dst ? dst_bytes : 0);
    page_op op = { .m = m, .n = n, .pages = pages, .host = dst, .to_host = true };
    return pie_rpc_call(&m->place.rpc, run_page_op, &op);
}

int32_t pie_write_pages(pie_model *m, int32_t n, const int32_t *pages, const void *src, size_t src_bytes) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    int32_t st = check_pages(&m->kv, n, pages, "write");
    if (st) return st;
    size_t need = (size_t)n * m->kv.page_bytes;
    if (need > 0 && (!src || src_bytes != need))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "write of %d pages needs exactly %zu bytes; got %zu", n, need, src ? src_bytes : 0);
    page_op op = { .m = m, .n = n, .pages = pages, .host = (uint8_t *)src, .to_host = false };
    return pie_rpc_call(&m->place.rpc, run_page_op, &op);
}
