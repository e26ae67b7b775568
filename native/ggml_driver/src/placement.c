/*
 * placement.c — which device holds each layer, as llama.cpp decides it, and the buffers and
 * backends on those devices.
 *
 * Devices: the offload devices (the local GPUs the `device` parameter picks, then the devices
 * of the RPC workers) and the CPU, always last (ggml's scheduler runs inputs and ops no one
 * else supports on its last backend). The last n_gpu_layers layers go to the offload devices,
 * split between them by tensor_split or by free memory; "layer" n_layer stands for the output
 * norm and head; the token embeddings stay on the CPU. A layer's KV pool tensors live with its
 * weights, so attention never crosses devices.
 */
#include "internal.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Devices                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static bool name_matches(const char *want, const char *have) {
    for (; *want && *have; want++, have++)
        if (tolower((unsigned char)*want) != tolower((unsigned char)*have)) return false;
    return *want == 0 && *have == 0;
}

static void device_list(char *out, size_t size) {
    out[0] = 0;
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        size_t len = strlen(out);
        snprintf(out + len, size - len, "%s%s", i ? ", " : "", ggml_backend_dev_name(ggml_backend_dev_get(i)));
    }
}

/* The local offload devices `want` names: "auto" = every GPU (else every integrated GPU),
 * "cpu" = none, "cuda:N" = CUDA<N>, "metal" = the Metal device, else a ggml device name. */
static int32_t local_devices(const char *want, ggml_backend_dev_t *out, int32_t *n) {
    if (ggml_backend_dev_count() == 0) ggml_backend_load_all(); /* dynamically loaded backends */
    *n = 0;
    const size_t count = ggml_backend_dev_count();
    if (want[0] == 0 || name_matches(want, "auto")) {
        const enum ggml_backend_dev_type order[] = { GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU };
        for (int k = 0; k < 2 && *n == 0; k++)
            for (size_t i = 0; i < count && *n < PIE_MAX_DEVICES - 1; i++)
                if (ggml_backend_dev_type(ggml_backend_dev_get(i)) == order[k]) out[(*n)++] = ggml_backend_dev_get(i);
        return PIE_OK;
    }
    if (name_matches(want, "cpu")) return PIE_OK;
    char name[40];
    if (strncmp(want, "cuda:", 5) == 0) snprintf(name, sizeof(name), "CUDA%s", want + 5);
    else snprintf(name, sizeof(name), "%s", want);
    for (size_t i = 0; i < count; i++) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        if (name_matches(name, ggml_backend_dev_name(d)) || (name_matches(want, "metal") && strstr(ggml_backend_dev_name(d), "MTL"))) {
            if (ggml_backend_dev_type(d) != GGML_BACKEND_DEVICE_TYPE_CPU) out[(*n)++] = d;
            return PIE_OK;
        }
    }
    char list[256];
    device_list(list, sizeof(list));
    return pie_set_error(PIE_ERR_UNSUPPORTED, "device '%s' not found (this ggml build has: %s)", want, list);
}

/* Fills place.dev, name and memory; place.rpc is parsed already (driver.c). */
int32_t pie_devices_open(pie_model *m) {
    pie_placement *pl = &m->place;
    ggml_backend_dev_t devs[PIE_MAX_DEVICES];
    int32_t n_local = 0, n_rpc = 0, st;
    if ((st = local_devices(m->params.device, devs, &n_local)) ||
        (st = pie_rpc_connect(&pl->rpc, devs + n_local, PIE_MAX_DEVICES - 1 - n_local, &n_rpc)))
        return st;
    pl->n_dev = n_local + n_rpc + 1;
    for (int d = 0; d < pl->n_dev; d++) {
        pl->dev[d] = d < pl->n_dev - 1 ? devs[d] : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!pl->dev[d]) return pie_set_error(PIE_ERR_UNSUPPORTED, "this ggml has no CPU device");
        if (d >= n_local && d < pl->n_dev - 1) {
            const int w = pl->rpc.dev_worker[d - n_local];
            int nth = 0; /* a worker with several devices: number them */
            for (int j = 0; j < d - n_local; j++) nth += pl->rpc.dev_worker[j] == w;
            if (nth) snprintf(pl->name[d], sizeof(pl->name[d]), "RPC %.40s #%d", pl->rpc.endpoint[w], nth);
            else snprintf(pl->name[d], sizeof(pl->name[d]), "RPC %.50s", pl->rpc.endpoint[w]);
        } else {
            snprintf(pl->name[d], sizeof(pl->name[d]), "%s", ggml_backend_dev_name(pl->dev[d]));
        }
        size_t free_b = 0, total_b = 0;
        ggml_backend_dev_memory(pl->dev[d], &free_b, &total_b);
        pl->free_bytes[d] = (int64_t)free_b;
        pl->total_bytes[d] = (int64_t)total_b;
    }
    return PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Layers                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* The layer a weight belongs to: 0 .. n_layer - 1 for "blk.N.*", n_layer for the output
 * norm and head (and any other tensor), -1 for the token embeddings (and per-layer ones). */
static int tensor_layer(const pie_model *m, const struct ggml_tensor *t) {
    const char *name = ggml_get_name(t);
    int il;
    if (sscanf(name, "blk.%d.", &il) == 1 && il >= 0 && il < m->hp.n_layer) return il;
    if (t == m->w.tok_embd || strcmp(name, "token_embd.weight") == 0) return -1;
    if (strcmp(name, "per_layer_token_embd.weight") == 0) return -1; /* gemma3n: rows looked up like the embeddings' */
    return m->hp.n_layer;
}

int pie_tensor_device(const pie_model *m, const struct ggml_tensor *t) {
    const pie_placement *pl = &m->place;
    if (t == m->w.output) return pl->output_dev; /* the head: a copy of the embeddings when tied */
    const int il = tensor_layer(m, t);
    return il < 0 ? pl->n_dev - 1 : il < m->hp.n_layer ? pl->layer_dev[il] : pl->output_dev;
}

/* Bytes of one layer's KV pool tensors (K and V, all pages). */
static int64_t layer_kv_bytes(const pie_model *m) {
    const pie_hparams *hp = &m->hp;
    const enum ggml_type type = m->params.kv_type == PIE_KV_Q8_0 ? GGML_TYPE_Q8_0 : GGML_TYPE_F16;
    const int64_t rows = (int64_t)m->params.page_size * m->params.n_pages;
    return rows * (int64_t)(ggml_row_size(type, (int64_t)hp->head_dim * hp->n_head_kv) +
                            ggml_row_size(type, (int64_t)hp->head_dim_v * hp->n_head_kv));
}

/* A rough size of the compute buffers on a device with `output` (the head's logits): activations
 * of a full batch, and attention scores over the whole KV. The reservation at load has the
 * real number; this only keeps `auto` from filling a device to the last byte. */
static int64_t compute_guess(const pie_model *m, bool output) {
    const pie_hparams *hp = &m->hp;
    const int64_t t = m->params.max_batch_tokens, kv = (int64_t)m->params.page_size * m->params.n_pages;
    const int64_t kv_batch = m->params.max_batch_kv > 0 && m->params.max_batch_kv < kv ? m->params.max_batch_kv : kv;
    int64_t bytes = 4 * t * (4 * (int64_t)hp->n_embd + 2 * (int64_t)hp->n_ff + (int64_t)hp->n_head * kv_batch);
    if (output) bytes += 4 * t * (int64_t)hp->n_vocab;
    return bytes;
}

/* As llama.cpp: layers n_layer - n_gpu .. n_layer - 1 on the offload devices by the cumulative
 * shares `cum`, and "layer" n_layer (the head) too when n_gpu > n_layer; the rest on the CPU. */
static void assign(pie_placement *pl, int n_layer, int n_gpu, const float *cum, int n_off) {
    const int cpu = pl->n_dev - 1, act = n_gpu < n_layer + 1 ? n_gpu : n_layer + 1;
    const int i_start = n_layer - n_gpu > 0 ? n_layer - n_gpu : 0;
    for (int il = 0; il <= n_layer; il++) {
        int d = cpu;
        if (il >= i_start && il - i_start < act && n_off > 0) {
            const float f = (float)(il - i_start) / (float)act;
            d = 0;
            while (d < n_off - 1 && f >= cum[d]) d++;
        }
        if (il < n_layer) pl->layer_dev[il] = (int8_t)d;
        else pl->output_dev = (int8_t)d;
    }
}

/* Per-device bytes of the current assignment (weights, KV, and a compute guess). */
static void tally(pie_model *m, const int64_t *layer_w, int64_t out_w, int64_t embd_w, int64_t kv_layer, int64_t *need) {
    pie_placement *pl = &m->place;
    for (int d = 0; d < pl->n_dev; d++) pl->weight_bytes[d] = pl->kv_bytes[d] = need[d] = 0;
    for (int il = 0; il < m->hp.n_layer; il++) {
        pl->weight_bytes[pl->layer_dev[il]] += layer_w[il];
        if (il < m->hp.n_layer_kv) pl->kv_bytes[pl->layer_dev[il]] += kv_layer;
    }
    pl->weight_bytes[pl->output_dev] += out_w;
    pl->weight_bytes[pl->n_dev - 1] += embd_w;
    for (int d = 0; d < pl->n_dev; d++) {
        const bool used = pl->weight_bytes[d] > 0 || d == pl->output_dev;
        need[d] = pl->weight_bytes[d] + pl->kv_bytes[d] + (used ? compute_guess(m, d == pl->output_dev) : 0);
    }
}

int32_t pie_place_layers(pie_model *m) {
    pie_placement *pl = &m->place;
    const int n_layer = m->hp.n_layer, n_off = pl->n_dev - 1, want = m->params.n_gpu_layers;
    if (want > n_layer + 1)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "n_gpu_layers %d is more than this model has: %d layers "
                             "(%d with the output head; -1 = as many as fit)", want, n_layer, n_layer + 1);
    if (want > 0 && n_off == 0) {
        char list[256];
        device_list(list, sizeof(list));
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "n_gpu_layers %d but there is no GPU or RPC worker to offload to "
                             "(device '%s'; this ggml has: %s)", want, m->params.device, list);
    }

    /* shares: the given split, else free memory, else equal */
    float share[PIE_MAX_DEVICES] = {0}, total = 0;
    for (int d = 0; d < PIE_MAX_DEVICES; d++) {
        const float s = m->params.tensor_split[d];
        if (s > 0 && d >= n_off)
            return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "tensor_split gives device %d a share, but there are only %d "
                                 "offload devices", d, n_off);
        if (d < n_off) total += share[d] = s;
    }
    if (total == 0)
        for (int d = 0; d < n_off; d++) total += share[d] = (float)pl->free_bytes[d];
    if (total == 0)
        for (int d = 0; d < n_off; d++) total += share[d] = 1.0f;
    float cum[PIE_MAX_DEVICES] = {0}, acc = 0;
    for (int d = 0; d < n_off; d++) cum[d] = (acc += share[d]) / total;

    /* bytes per layer */
    int64_t layer_w[PIE_MAX_LAYERS] = {0}, out_w = 0, embd_w = 0;
    for (struct ggml_tensor *t = ggml_get_first_tensor(m->ctx_w); t; t = ggml_get_next_tensor(m->ctx_w, t)) {
        const int il = tensor_layer(m, t);
        const int64_t nb = (int64_t)ggml_nbytes(t);
        if (il < 0) embd_w += nb;
        else if (il < n_layer) layer_w[il] += nb;
        else out_w += nb;
    }
    if (m->w.output == m->w.tok_embd) out_w += (int64_t)ggml_nbytes(m->w.tok_embd); /* offloaded: a copy */
    const int64_t kv_layer = layer_kv_bytes(m);

    int64_t need[PIE_MAX_DEVICES];
    int n = want;
    if (want < 0) { /* auto: the most layers whose devices all fit */
        for (n = n_off ? n_layer + 1 : 0; n > 0; n--) {
            assign(pl, n_layer, n, cum, n_off);
            tally(m, layer_w, out_w, embd_w, kv_layer, need);
            bool fits = true;
            for (int d = 0; d < n_off; d++) fits = fits && need[d] <= pl->free_bytes[d];
            if (fits) break;
        }
    }
    assign(pl, n_layer, n, cum, n_off);
    tally(m, layer_w, out_w, embd_w, kv_layer, need);
    if (n <= n_layer) pl->weight_bytes[pl->n_dev - 1] -= m->w.output == m->w.tok_embd ? (int64_t)ggml_nbytes(m->w.tok_embd) : 0;
    pl->n_gpu_layers = n;
    return PIE_OK;
}

bool pie_offloaded(const pie_model *m) {
    const pie_placement *pl = &m->place;
    return pl->output_dev != pl->n_dev - 1 || (m->hp.n_layer > 0 && pl->layer_dev[m->hp.n_layer - 1] != pl->n_dev - 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Buffers                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* One buffer of `bytes` on device d for tensors[first .. last) at their offsets. */
static int32_t alloc_chunk(pie_model *m, int d, struct ggml_tensor **ts, const size_t *offs, int first, int last,
                           size_t bytes, enum ggml_backend_buffer_usage usage) {
    pie_placement *pl = &m->place;
    if (pl->n_buf >= PIE_MAX_BUFFERS) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "more than %d buffers", PIE_MAX_BUFFERS);
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(ggml_backend_dev_buffer_type(pl->dev[d]), bytes);
    if (!buf)
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of %s on %s (%.1f MiB free of %.1f MiB); "
                             "offload fewer layers (n_gpu_layers) or use fewer KV pages", bytes / 1048576.0,
                             usage == GGML_BACKEND_BUFFER_USAGE_WEIGHTS ? "weights" : "KV pool", pl->name[d],
                             pl->free_bytes[d] / 1048576.0, pl->total_bytes[d] / 1048576.0);
    pl->buf[pl->n_buf++] = buf;
    ggml_backend_buffer_set_usage(buf, usage);
    uint8_t *base = ggml_backend_buffer_get_base(buf);
    for (int i = first; i < last; i++)
        if (ggml_backend_tensor_alloc(buf, ts[i], base + offs[i]) != GGML_STATUS_SUCCESS)
            return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot place tensor '%s' on %s", ggml_get_name(ts[i]), pl->name[d]);
    return PIE_OK;
}

int32_t pie_alloc_on_devices(pie_model *m, struct ggml_tensor **ts, const int *dev, int n,
                             enum ggml_backend_buffer_usage usage) {
    pie_placement *pl = &m->place;
    size_t *offs = malloc(sizeof(size_t) * (size_t)(n > 0 ? n : 1));
    struct ggml_tensor **mine = malloc(sizeof(*mine) * (size_t)(n > 0 ? n : 1));
    if (!offs || !mine) { free(offs); free(mine); return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot plan buffers"); }
    int32_t st = PIE_OK;
    for (int d = 0; d < pl->n_dev && st == PIE_OK; d++) {
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(pl->dev[d]);
        const size_t align = ggml_backend_buft_get_alignment(buft), max = ggml_backend_buft_get_max_size(buft);
        int k = 0, first = 0;
        size_t used = 0;
        for (int i = 0; i < n; i++)
            if (dev[i] == d) mine[k++] = ts[i];
        /* pack in order; a new buffer starts where the next tensor would pass the type's max */
        for (int i = 0; i < k && st == PIE_OK; i++) {
            const size_t sz = GGML_PAD(ggml_backend_buft_get_alloc_size(buft, mine[i]), align);
            if (used > 0 && used + sz > max) {
                st = alloc_chunk(m, d, mine, offs, first, i, used, usage);
                first = i;
                used = 0;
            }
            offs[i] = used;
            used += sz;
        }
        if (st == PIE_OK && used > 0) st = alloc_chunk(m, d, mine, offs, first, k, used, usage);
    }
    free(offs);
    free(mine);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Backends and the scheduler                                                                 */
/* ------------------------------------------------------------------------------------------ */

int32_t pie_sched_new(pie_model *m, size_t n_nodes) {
    pie_placement *pl = &m->place;
    if (m->sched) ggml_backend_sched_free(m->sched);
    /* op_offload: like llama.cpp, a device may run a big batch's op whose weights are on the CPU */
    m->sched = ggml_backend_sched_new(pl->backend, NULL, pl->n_dev, n_nodes, false, true);
    return m->sched ? PIE_OK : pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot create a scheduler for %zu graph nodes", n_nodes);
}

void pie_set_cpu_threads(pie_model *m, int n_threads) {
    const pie_placement *pl = &m->place;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(pl->dev[pl->n_dev - 1]);
    ggml_backend_set_n_threads_t set_threads =
        reg ? (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : NULL;
    if (set_threads) set_threads(pl->backend[pl->n_dev - 1], n_threads);
}

int32_t pie_compute_open(pie_model *m, int n_threads, size_t n_nodes) {
    pie_placement *pl = &m->place;
    for (int d = 0; d < pl->n_dev; d++) {
        pl->backend[d] = ggml_backend_dev_init(pl->dev[d], NULL);
        if (!pl->backend[d]) return pie_set_error(PIE_ERR_BACKEND, "cannot start the %s backend", pl->name[d]);
    }
    pie_set_cpu_threads(m, n_threads);
    return pie_sched_new(m, n_nodes);
}

void pie_devices_close(pie_model *m) {
    pie_placement *pl = &m->place;
    if (m->sched) ggml_backend_sched_free(m->sched);
    m->sched = NULL;
    for (int d = 0; d < pl->n_dev; d++)
        if (pl->backend[d]) ggml_backend_free(pl->backend[d]);
    for (int i = 0; i < pl->n_buf; i++) ggml_backend_buffer_free(pl->buf[i]);
    if (pl->ctx_dup) ggml_free(pl->ctx_dup);
    pie_rpc_release(&pl->rpc);
    memset(pl->backend, 0, sizeof(pl->backend));
    pl->n_buf = 0;
    pl->ctx_dup = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Reporting                                                                                  */
/* ------------------------------------------------------------------------------------------ */

void pie_placement_report(const pie_model *m, pie_device_use *out, int32_t cap, int32_t *n_out) {
    const pie_placement *pl = &m->place;
    *n_out = pl->n_dev;
    for (int d = 0; d < pl->n_dev && d < cap; d++) {
        pie_device_use *u = &out[d];
        memset(u, 0, sizeof(*u));
        snprintf(u->name, sizeof(u->name), "%s", pl->name[d]);
        snprintf(u->description, sizeof(u->description), "%s", ggml_backend_dev_description(pl->dev[d]));
        u->is_cpu = d == pl->n_dev - 1;
        u->first_layer = -1;
        for (int il = 0; il < m->hp.n_layer; il++) {
            if (pl->layer_dev[il] != d) continue;
            if (u->first_layer < 0) u->first_layer = il;
            u->n_layers++;
        }
        u->input = u->is_cpu;
        u->output = pl->output_dev == d;
        u->weight_bytes = pl->weight_bytes[d];
        u->kv_bytes = pl->kv_bytes[d];
        u->compute_bytes = pl->compute_bytes[d];
        u->free_bytes = pl->free_bytes[d];
        u->total_bytes = pl->total_bytes[d];
    }
}
