/*
 * driver.c — the public lifecycle: ABI checks, parameters, model load/free/info, and
 * pie_forward (plan -> graph -> compute -> sample). Devices: placement.c, rpc.c. Errors and
 * logs: status.c, log.c.
 */
#include "internal.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Version and ABI                                                                            */
/* ------------------------------------------------------------------------------------------ */

int32_t pie_abi_version(void) { return PIE_ABI_VERSION; }

size_t pie_struct_size(int32_t which) {
    switch (which) {
        case PIE_STRUCT_MODEL_PARAMS: return sizeof(pie_model_params);
        case PIE_STRUCT_MODEL_INFO:   return sizeof(pie_model_info);
        case PIE_STRUCT_SAMPLER:      return sizeof(pie_sampler);
        case PIE_STRUCT_BATCH:        return sizeof(pie_batch);
        case PIE_STRUCT_DEVICE_USE:   return sizeof(pie_device_use);
        default:                      return 0;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Parameters and devices                                                                     */
/* ------------------------------------------------------------------------------------------ */

pie_model_params pie_model_default_params(void) {
    pie_model_params p;
    memset(&p, 0, sizeof(p));
    p.n_threads = 0;
    snprintf(p.device, sizeof(p.device), "auto");
    p.page_size = 32;
    p.n_pages = 256;
    p.kv_type = PIE_KV_F16;
    p.max_batch_tokens = 512;
    p.max_batch_kv = 0;
    p.use_mmap = 1;
    p.repack = 1;
    p.own_kernels = 1;
    p.n_gpu_layers = -1;
    return p;
}

/* The CPU threads to run: "auto" (n_threads <= 0) the cores this process may use, adapted to the
 * load while it runs (threads.h); an explicit count as given, but at most one per online CPU.
 * More would only slow a pass down (ggml's workers spin while they wait for each other), and
 * ggml aborts when it cannot create a thread; so a count meant for a bigger machine runs on this
 * one with a warning rather than failing. */
static int cpu_threads(int32_t n_threads) {
    if (n_threads <= 0) return pie_threads_allowed();
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    int limit = online > 0 ? (int)online : 1;
    if (limit > GGML_MAX_N_THREADS) limit = GGML_MAX_N_THREADS;
    if (n_threads <= limit) return n_threads;
    pie_log(PIE_LOG_WARN, "n_threads %d is more than the %d CPUs online; using %d", n_threads, limit, limit);
    return limit;
}

static int32_t check_params(const pie_model_params *p) {
    if (p->page_size < 1 || p->page_size > 4096) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "page_size %d outside 1..4096", p->page_size);
    if (p->n_pages < 1) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "n_pages must be >= 1 (got %d)", p->n_pages);
    if ((int64_t)p->page_size * p->n_pages > INT32_MAX) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "page_size * n_pages overflows");
    if (p->kv_type != PIE_KV_F16 && p->kv_type != PIE_KV_Q8_0) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "unknown kv_type %d", p->kv_type);
    if (p->max_batch_tokens < 1) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "max_batch_tokens must be >= 1 (got %d)", p->max_batch_tokens);
    if (p->max_batch_kv < 0) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "max_batch_kv must be >= 0 (got %d)", p->max_batch_kv);
    if (memchr(p->device, 0, sizeof(p->device)) == NULL) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "device name is not terminated");
    if (memchr(p->rpc, 0, sizeof(p->rpc)) == NULL) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "RPC worker list is not terminated");
    if (p->n_gpu_layers < -1)
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "n_gpu_layers must be -1 (as many as fit) or >= 0 (got %d)", p->n_gpu_layers);
    for (int d = 0; d < PIE_MAX_DEVICES; d++)
        if (!isfinite(p->tensor_split[d]) || p->tensor_split[d] < 0)
            return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "tensor_split[%d] is %g; shares must be finite and >= 0", d,
                                 (double)p->tensor_split[d]);
    return PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Lifecycle                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Upper bound of graph nodes for a batch of n_requests whose KV lies in n_runs runs and whose
 * products split into n_pieces (pie_matmul): a layer needs ~50 nodes plus ~16 per request (its
 * views, gathers and attention), 4 per run (a K and a V view and concat) and, for each of its
 * 7 matrices, 3 per piece (view, product, concat); plus what the family adds (pie_arch's
 * extra_nodes). */
static size_t graph_nodes(const pie_model *m, int32_t n_requests, int32_t n_runs, int32_t n_pieces) {
    /* experts (moe.c): routing and the sum over the used experts, 2 more dense matrices (router,
     * shared expert) and 3 expert products whose wide spans also split per request (pie_matmul_id) */
    const size_t moe = m->hp.n_expert ? 32 + 2 * (size_t)m->hp.n_expert_used + 18 * ((size_t)n_pieces + (size_t)n_requests) : 0;
    const size_t extra = m->hp.arch->extra_nodes ? m->hp.arch->extra_nodes(&m->hp, (size_t)n_pieces) : 0;
    return (size_t)m->hp.n_layer * (64 + 16 * (size_t)n_requests + 4 * (size_t)n_runs + 21 * (size_t)n_pieces + moe) + 256 + extra;
}

/* (Re)creates the scheduler and graph metadata for graphs of up to n_nodes; the scheduler's
 * tables have a fixed size, so a batch with more requests than ever before rebuilds them. */
static int32_t reserve_graph(pie_model *m, size_t n_nodes) {
    free(m->graph_meta);
    m->graph_meta_size = ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false);
    m->graph_meta = malloc(m->graph_meta_size);
    m->graph_cap = 0;
    if (!m->graph_meta) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate graph metadata for %zu nodes", n_nodes);
    int32_t st = m->sched ? pie_sched_new(m, n_nodes) : pie_compute_open(m, cpu_threads(m->params.n_threads), n_nodes);
    if (st == PIE_OK) m->graph_cap = n_nodes;
    return st;
}

static int32_t build_graph(pie_model *m, pie_graph *g);

/* The compute buffers of the largest batch the parameters allow (all tokens of one request
 * sampled, attending over the most KV) are reserved now. With layers off the CPU, a device that
 * is too small fails the load with the numbers instead of a later batch. On the CPU it keeps the
 * buffer from growing batch by batch: ggml replaces a buffer that is too small by a new one, and
 * decode steps whose KV grows by a row each needed a fresh, page-faulting buffer every step
 * (8 forks decoding over a 512-token prompt spent a fifth of their time in the kernel). Host
 * memory is committed only as it is touched, so the reserve costs address space, not RAM. */
static int32_t reserve_worst_case(pie_model *m) {
    const pie_model_params *p = &m->params;
    const bool encoder = m->hp.arch->needs & PIE_NON_CAUSAL; /* hidden states of one whole input */
    int32_t kv = p->max_batch_kv < p->page_size * p->n_pages ? p->max_batch_kv : p->page_size * p->n_pages;
    const int32_t nq = p->max_batch_tokens < kv ? p->max_batch_tokens : kv;
    if (encoder) kv = nq;
    const int32_t n_pages = (kv + p->page_size - 1) / p->page_size;
    int32_t *ints = calloc((size_t)(4 * nq + n_pages + 6), sizeof(int32_t));
    pie_sampler *samplers = calloc((size_t)nq, sizeof(pie_sampler));
    int32_t st = ints && samplers ? PIE_OK : pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot build the worst-case batch");
    if (st == PIE_OK) {
        int32_t *tokens = ints, *positions = tokens + nq, *rows = positions + nq, *out = rows + nq, *pages = out + nq;
        int32_t *misc = pages + n_pages;
        for (int32_t i = 0; i < nq; i++) { positions[i] = m->hp.n_pos > 0 ? i % m->hp.n_pos : kv - nq + i; rows[i] = i; }
        for (int32_t i = 0; i < n_pages; i++) pages[i] = i;
        for (int32_t i = 0; i < nq; i++) samplers[i].top_p = 1.0f; /* greedy */
        int32_t *qo = misc, *kv_ptr = misc + 2, *last = misc + 4;
        qo[1] = nq;
        kv_ptr[1] = n_pages;
        last[0] = kv - (n_pages - 1) * p->page_size;
        pie_batch b = { .n_tokens = nq, .tokens = tokens, .positions = positions, .n_requests = 1, .qo_indptr = qo,
                        .kv_page_indices = pages, .kv_page_indptr = kv_ptr, .kv_last_page_len = last,
                        .n_outputs = nq, .output_rows = rows, .samplers = samplers, .out_tokens = out };
        if (encoder) { /* out_hidden is never written: the graph is only reserved */
            b.return_flags = PIE_RETURN_HIDDEN | PIE_RETURN_HIDDEN_ONLY;
            b.out_hidden = (float *)ints;
        }
        pie_graph g;
        if ((st = pie_plan_build(m, &b)) == PIE_OK && (st = build_graph(m, &g)) == PIE_OK) {
            if (!ggml_backend_sched_reserve(m->sched, g.gf)) {
                char sizes[512] = "";
                for (int d = 0; d < m->place.n_dev; d++) {
                    size_t len = strlen(sizes);
                    snprintf(sizes + len, sizeof(sizes) - len, "%s%s: %.1f MiB weights + %.1f MiB KV, %.1f MiB free",
                             d ? "; " : "", m->place.name[d], m->place.weight_bytes[d] / 1048576.0,
                             m->place.kv_bytes[d] / 1048576.0, m->place.free_bytes[d] / 1048576.0);
                }
                st = pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot reserve compute buffers for a batch of %d tokens over %d "
                                   "KV rows (%s); %slower max_batch_tokens or n_pages", nq, kv, sizes,
                                   pie_offloaded(m) ? "offload fewer layers (n_gpu_layers), or " : "");
            }
            for (int d = 0; d < m->place.n_dev; d++)
                m->place.compute_bytes[d] = (int64_t)ggml_backend_sched_get_buffer_size(m->sched, m->place.backend[d]);
            ggml_free(g.ctx);
        }
    }
    free(ints);
    free(samplers);
    return st;
}

/* The driver's own kernels run where the option asks for them and the CPU backend computes the
 * graph (each kind then checks the CPU has its instructions). */
bool pie_own_kernels(const pie_model *m) {
    const pie_placement *pl = &m->place;
    return m->params.own_kernels && ggml_backend_dev_type(pl->dev[pl->n_dev - 1]) == GGML_BACKEND_DEVICE_TYPE_CPU;
}

static int32_t init_compute(pie_model *m) {
    const int threads = cpu_threads(m->params.n_threads);
    int32_t st = reserve_graph(m, graph_nodes(m, 16, 16, 16));
    if (st != PIE_OK) return st;
    m->sampler = pie_sampler_scratch_new(m->hp.n_vocab);
    m->plan.page_stamp = malloc(sizeof(int32_t) * (size_t)m->params.n_pages);
    m->plan.slot_writer = calloc((size_t)m->params.n_pages * (size_t)m->params.page_size, sizeof(int32_t));
    m->plan.marked = malloc(sizeof(int64_t) * (size_t)m->params.max_batch_tokens);
    m->plan.zeros = calloc((size_t)m->pad_width + 1, sizeof(float));
    if (!m->sampler || !m->plan.page_stamp || !m->plan.slot_writer || !m->plan.marked || !m->plan.zeros)
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate driver scratch");
    /* the name of what runs the graph: every device that holds a part, in order */
    const pie_placement *pl = &m->place;
    m->backend_name[0] = 0;
    for (int d = 0; d < pl->n_dev; d++) {
        bool used = d == pl->n_dev - 1 || pl->output_dev == d;
        for (int il = 0; il < m->hp.n_layer && !used; il++) used = pl->layer_dev[il] == d;
        size_t len = strlen(m->backend_name);
        if (used) snprintf(m->backend_name + len, sizeof(m->backend_name) - len, "%s%s", len ? "+" : "",
                           ggml_backend_dev_name(pl->dev[d]));
    }
    /* only a graph wholly on the CPU waits on its threads; with offloaded layers the count stays */
    pie_threads_init(&m->threads, threads, m->params.n_threads <= 0 && !pie_offloaded(m));
    pie_log(PIE_LOG_INFO, "compute on %s, %d of %d layers offloaded, %d CPU threads%s", m->backend_name,
            pl->n_gpu_layers > m->hp.n_layer ? m->hp.n_layer : pl->n_gpu_layers, m->hp.n_layer, threads,
            m->threads.adaptive ? " (auto: fewer while other processes load the CPUs)" : "");
    const bool own = pie_own_kernels(m);
    if (own && pie_q8_supported() && (st = pie_q8_open(m)) != PIE_OK) return st;
    if (own && pie_attn_cpu_supported() && (st = pie_attn_cpu_open(m, m->threads.max, m->params.max_batch_kv)) != PIE_OK)
        return st;
    st = reserve_worst_case(m); /* builds a graph: prepares the q8 kernels' matrices */
    if (st == PIE_OK) pie_q8_log_prepared(m);
    return st;
}

typedef struct {
    pie_model  *m;
    const char *path;
    bool        plan_only;
} load_call;

static int32_t run_load(void *p) {
    load_call *c = p;
    pie_model *m = c->m;
    int32_t st;
    if ((st = pie_devices_open(m)) || (st = pie_load_weights(m, c->path, c->plan_only)) || c->plan_only) return st;
    if (m->params.max_batch_kv == 0) m->params.max_batch_kv = m->params.page_size * m->params.n_pages;
    if ((st = pie_kv_init(m)) || (st = init_compute(m))) return st;
    return PIE_OK;
}

static int32_t run_free(void *p) {
    pie_model *m = p;
    pie_devices_close(m);
    return PIE_OK;
}

/* Loads (or with plan_only only places) a model; NULL and the status on failure. */
static int32_t load(const char *path, const pie_model_params *params, bool plan_only, pie_model **out) {
    *out = NULL;
    if (!path) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "path is NULL");
    pie_log_capture_ggml();
    pie_model *m = calloc(1, sizeof(*m));
    if (!m) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate the model");
    m->params = params ? *params : pie_model_default_params();
    int32_t st = check_params(&m->params);
    if (st == PIE_OK && (st = pie_rpc_parse(m->params.rpc, &m->place.rpc)) == PIE_OK) {
        load_call c = { m, path, plan_only };
        st = pie_rpc_call(&m->place.rpc, run_load, &c);
    }
    if (st != PIE_OK) {
        pie_model_free(m);
        return st;
    }
    *out = m;
    return PIE_OK;
}

int32_t pie_model_load(const char *path, const pie_model_params *params, pie_model **out_model) {
    if (!out_model) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "out_model is NULL");
    return load(path, params, false, out_model);
}

void pie_model_free(pie_model *m) {
    if (!m) return;
    if (m->place.rpc.dead) { /* a helper thread may still be inside ggml with this model */
        pie_log(PIE_LOG_WARN, "a model whose RPC worker was lost keeps its memory until the process ends");
        return;
    }
    if (pie_rpc_call(&m->place.rpc, run_free, m) != PIE_OK) return; /* lost a worker while freeing: leak */
    pie_kv_free(&m->kv);
    pie_attn_cpu_free(m);
    pie_q8_free(m); /* before the weights: its matrices are named by their tensors */
    pie_free_weights(m);
    pie_plan_free(&m->plan);
    pie_sampler_scratch_free(m->sampler);
    free(m->graph_meta);
    free(m->logits);
    free(m);
}

int32_t pie_model_devices(const pie_model *m, pie_device_use *out, int32_t cap, int32_t *n_out) {
    if (!m || !n_out || (cap > 0 && !out)) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model, out and n_out are required");
    pie_placement_report(m, out, cap, n_out);
    return PIE_OK;
}

int32_t pie_plan_devices(const char *path, const pie_model_params *params, pie_device_use *out, int32_t cap, int32_t *n_out) {
    if (!n_out || (cap > 0 && !out)) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "out and n_out are required");
    pie_model *m;
    int32_t st = load(path, params, true, &m);
    if (st != PIE_OK) return st;
    pie_placement_report(m, out, cap, n_out);
    pie_model_free(m);
    return PIE_OK;
}

int32_t pie_model_threads(const pie_model *m) { return m ? m->threads.n : 0; }

int32_t pie_model_get_info(const pie_model *m, pie_model_info *out) {
    if (!m || !out) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model and out_info are required");
    memset(out, 0, sizeof(*out));
    const pie_hparams *hp = &m->hp;
    snprintf(out->arch, sizeof(out->arch), "%s", hp->arch->name);
    snprintf(out->name, sizeof(out->name), "%s", hp->name);
    snprintf(out->backend, sizeof(out->backend), "%s", m->backend_name);
    out->n_vocab = hp->n_vocab;
    out->n_ctx_train = hp->n_ctx_train;
    out->n_embd = hp->n_embd;
    out->n_layer = hp->n_layer;
    out->n_head = hp->n_head;
    out->n_head_kv = hp->n_head_kv;
    out->head_dim = hp->head_dim;
    out->sliding_window = hp->sliding_window;
    out->page_size = m->kv.page_size;
    out->n_pages = m->kv.n_pages;
    out->kv_type = m->params.kv_type;
    out->max_batch_tokens = m->params.max_batch_tokens;
    out->n_params = m->n_params;
    out->weight_bytes = m->weight_bytes;
    out->kv_bytes = m->kv.total_bytes;
    out->page_bytes = (int64_t)m->kv.page_bytes;
    out->n_repacked = m->n_repacked;
    out->embedding_only = (hp->arch->needs & PIE_NON_CAUSAL) != 0;
    return PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Forward                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* An input no node reads is left out of the graph and never allocated (positions when no layer
 * rotates, the global mask when every layer slides): it gets no data either. */
static void set_input(struct ggml_tensor *t, const void *data, size_t size) {
    if (t && t->buffer) ggml_backend_tensor_set(t, data, 0, size);
}

static void upload_inputs(const pie_model *m, const pie_graph *g, const pie_batch *b) {
    const pie_plan *p = &m->plan;
    const size_t nt = (size_t)p->n_tokens, mask_bytes = sizeof(ggml_fp16_t) * (size_t)p->n_mask;
    set_input(g->tokens, b->tokens, sizeof(int32_t) * nt);
    set_input(g->positions, b->positions, sizeof(int32_t) * nt);
    set_input(g->write_rows, p->write_rows, sizeof(int64_t) * nt);
    set_input(g->gather_rows, p->gather_rows, sizeof(int32_t) * (size_t)p->n_gather);
    set_input(g->mask, p->mask, mask_bytes);
    set_input(g->mask_swa, p->mask_swa, mask_bytes);
    set_input(g->out_rows, p->out_rows, sizeof(int32_t) * (size_t)p->n_outputs);
    if (g->zeros) set_input(g->zeros, p->zeros, ggml_nbytes(g->zeros));
    set_input(g->attn_temp, p->attn_temp, sizeof(float) * nt);
}

/* ggml_backend_sched's eval callback: offers each f32 node to the host's activation callback
 * and hands over the values of the ones it asks for, as contiguous floats. */
static bool eval_activation(struct ggml_tensor *t, bool ask, void *user_data) {
    const pie_model *m = user_data;
    if (t->type != GGML_TYPE_F32) return false;
    if (ask) return m->activation_cb(ggml_get_name(t), t->ne, NULL, m->activation_user) != 0;
    /* views may be strided: read the bytes they span, then gather the elements in order */
    const size_t span = ggml_nbytes(t), n = (size_t)ggml_nelements(t);
    uint8_t *raw = malloc(span);
    float *vals = ggml_is_contiguous(t) ? (float *)raw : malloc(n * sizeof(float));
    if (!raw || !vals) {
        pie_log(PIE_LOG_WARN, "no memory to copy activation '%s' (%zu bytes)", ggml_get_name(t), span);
    } else {
        ggml_backend_tensor_get(t, raw, 0, span);
        if (vals != (float *)raw) {
            size_t i = 0;
            for (int64_t i3 = 0; i3 < t->ne[3]; i3++)
                for (int64_t i2 = 0; i2 < t->ne[2]; i2++)
                    for (int64_t i1 = 0; i1 < t->ne[1]; i1++)
                        for (int64_t i0 = 0; i0 < t->ne[0]; i0++)
                            vals[i++] = *(const float *)(raw + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3]);
        }
        m->activation_cb(ggml_get_name(t), t->ne, vals, m->activation_user);
    }
    if (vals != (float *)raw) free(vals);
    free(raw);
    return true; /* false would stop the computation */
}

int32_t pie_set_activation_callback(pie_model *m, pie_activation_callback callback, void *user_data) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    m->activation_cb = callback;
    m->activation_user = user_data;
    return PIE_OK;
}

/* Samples every output row, rows in parallel on the pass's threads. A row that fails fails alone
 * when the caller takes per-row statuses (b->out_status), else it fails the call; either way its
 * message names the row (sampled again on this thread: the workers' messages are their own). */
static int32_t sample_rows(pie_model *m, const pie_batch *b, const float *logits) {
    const int32_t n_vocab = m->hp.n_vocab, words = (n_vocab + 31) / 32, n_out = b->n_outputs;
    const bool top = b->return_flags & PIE_RETURN_TOP_K;
    float *logprobs = (b->return_flags & PIE_RETURN_LOGPROB) ? b->out_logprobs : NULL;
    int32_t *status = b->out_status ? b->out_status : malloc(sizeof(int32_t) * (size_t)n_out);
    if (!status) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate row statuses for %d rows", n_out);
    int32_t st = pie_sample_rows(m->sampler, m->threads.n, n_out, logits, n_vocab, b->logit_masks, b->samplers,
                                 b->out_tokens, logprobs, top ? b->top_k : 0, top ? b->out_top_ids : NULL,
                                 top ? b->out_top_probs : NULL, status);
    for (int32_t i = 0; st == PIE_OK && i < n_out; i++) {
        if (status[i] != PIE_OK) {
            int32_t token;
            pie_sample_row(m->sampler, logits + (size_t)i * n_vocab, n_vocab,
                           b->logit_masks ? b->logit_masks + (size_t)i * words : NULL, &b->samplers[i], &token,
                           NULL, top ? b->top_k : 0, top ? b->out_top_ids + (size_t)i * b->top_k : NULL,
                           top ? b->out_top_probs + (size_t)i * b->top_k : NULL);
            char why[PIE_ROW_ERROR_SIZE];
            snprintf(why, sizeof(why), "%s", pie_last_error());
            status[i] = pie_set_error(status[i], "output %d: %s", i, why);
            if (!b->out_status) st = status[i];
            b->out_tokens[i] = -1;
        }
        if (b->out_status && b->out_errors)
            snprintf(b->out_errors + (size_t)i * PIE_ROW_ERROR_SIZE, PIE_ROW_ERROR_SIZE, "%s", status[i] ? pie_last_error() : "");
    }
    if (!b->out_status) free(status);
    return st;
}

/* The graph of the planned batch in g (its context is the caller's to free). */
static int32_t build_graph(pie_model *m, pie_graph *g) {
    const pie_plan *p = &m->plan;
    const size_t n_nodes = graph_nodes(m, p->n_requests, p->n_runs, p->token_layout.n_pieces + p->output_layout.n_pieces);
    int32_t st;
    if (n_nodes > m->graph_cap && (st = reserve_graph(m, n_nodes + n_nodes / 2)) != PIE_OK) return st;
    struct ggml_init_params ip = { .mem_size = m->graph_meta_size, .mem_buffer = m->graph_meta, .no_alloc = true };
    *g = (pie_graph){ .ctx = ggml_init(ip), .model = m };
    if (!g->ctx) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot create the graph context");
    g->gf = ggml_new_graph_custom(g->ctx, m->graph_cap, false);
    pie_graph_begin(g);
    m->hp.arch->build(g);
    return PIE_OK;
}

typedef struct {
    pie_model       *m;
    const pie_batch *b;
} forward_call;

static int32_t run_forward(void *p) {
    pie_model *m = ((forward_call *)p)->m;
    const pie_batch *b = ((forward_call *)p)->b;
    int32_t st = pie_plan_build(m, b);
    if (st != PIE_OK) return st;

    /* host room for the sampled rows' logits, unless the caller's buffer takes them or the pass
     * stops at the hidden state */
    const int32_t n_out = b->n_outputs, n_vocab = m->hp.n_vocab;
    float *logits = b->out_logits;
    if (m->plan.head && !(b->return_flags & PIE_RETURN_LOGITS)) {
        const size_t need = (size_t)n_out * (size_t)n_vocab;
        if (need > m->logits_cap) {
            float *grown = realloc(m->logits, need * sizeof(float));
            if (!grown) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate logits for %d rows", n_out);
            m->logits = grown;
            m->logits_cap = need;
        }
        logits = m->logits;
    }

    pie_graph g;
    if ((st = build_graph(m, &g)) != PIE_OK) return st;
    ggml_backend_sched_reset(m->sched);
    if (!ggml_backend_sched_alloc_graph(m->sched, g.gf)) {
        ggml_free(g.ctx);
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate compute buffers for %d tokens in %d requests",
                             m->plan.n_tokens, m->plan.n_requests);
    }
    upload_inputs(m, &g, b);
    ggml_backend_sched_set_eval_callback(m->sched, m->activation_cb ? eval_activation : NULL, m);
    /* the thread count of this pass (auto: adapted to the load, see threads.h), and its time */
    pie_set_cpu_threads(m, pie_threads_begin(&m->threads, pie_threads_shape_key(m->plan.n_tokens, n_out)));
    const double t_compute = pie_threads_now();
    const enum ggml_status computed = ggml_backend_sched_graph_compute(m->sched, g.gf);
    pie_threads_end(&m->threads, pie_threads_now() - t_compute);
    if (computed != GGML_STATUS_SUCCESS) {
        ggml_free(g.ctx);
        return pie_set_error(PIE_ERR_BACKEND, "the %s backend failed to compute the batch", m->backend_name);
    }

    if (n_out > 0) {
        if (b->return_flags & PIE_RETURN_HIDDEN)
            ggml_backend_tensor_get(g.hidden, b->out_hidden, 0, sizeof(float) * (size_t)n_out * (size_t)m->hp.n_embd);
        if (m->plan.head) {
            ggml_backend_tensor_get(g.logits, logits, 0, sizeof(float) * (size_t)n_out * (size_t)n_vocab);
            st = sample_rows(m, b, logits);
        }
    }
    ggml_free(g.ctx);
    return st;
}

int32_t pie_forward(pie_model *m, const pie_batch *b) {
    if (!m) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "model is NULL");
    forward_call c = { m, b };
    return pie_rpc_call(&m->place.rpc, run_forward, &c);
}
