/*
 * pie_driver.h — the one public C contract of pie-local's native driver.
 *
 * The driver loads a GGUF model onto a ggml backend and runs batched forward passes over a
 * paged KV cache whose page ids are owned by the caller (the Python runtime). It never prints:
 * logs go to a callback. Every fallible call returns a pie_status and sets a thread-local
 * message readable with pie_last_error().
 *
 * Reading order: status codes, params, model lifecycle, the batch, page operations, debugging.
 */
#ifndef PIE_DRIVER_H
#define PIE_DRIVER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define PIE_API __declspec(dllexport)
#else
#define PIE_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a public struct or signature changes; the binding refuses a mismatch. */
#define PIE_ABI_VERSION 6

/* ------------------------------------------------------------------------------------------ */
/* Status codes                                                                               */
/* ------------------------------------------------------------------------------------------ */

typedef enum {
    PIE_OK                  =  0,
    PIE_ERR_IO              = -1, /* file missing, unreadable, short read                     */
    PIE_ERR_FORMAT          = -2, /* not a GGUF, corrupt metadata, tensor shape mismatch      */
    PIE_ERR_UNSUPPORTED     = -3, /* unknown architecture, unsupported tensor type or device  */
    PIE_ERR_OUT_OF_MEMORY   = -4, /* allocation of weights, KV pools or compute buffers failed */
    PIE_ERR_INVALID_ARGUMENT = -5,/* a bad batch, page id, length or parameter                */
    PIE_ERR_BACKEND         = -6, /* the ggml backend failed to compute                       */
} pie_status;

/* The message of the last failed call on this thread ("" when none). Valid until the next
 * failing call on the same thread. */
PIE_API const char *pie_last_error(void);

/* Short name of a status code, e.g. "invalid_argument". */
PIE_API const char *pie_status_name(int32_t status);

/* ------------------------------------------------------------------------------------------ */
/* Version, ABI and supported architectures                                                   */
/* ------------------------------------------------------------------------------------------ */

PIE_API int32_t pie_abi_version(void);

/* sizeof() of each public struct, so the binding can verify its own layouts. */
typedef enum {
    PIE_STRUCT_MODEL_PARAMS = 0,
    PIE_STRUCT_MODEL_INFO   = 1,
    PIE_STRUCT_SAMPLER      = 2,
    PIE_STRUCT_BATCH        = 3,
    PIE_STRUCT_DEVICE_USE   = 4,
} pie_struct_id;
PIE_API size_t pie_struct_size(int32_t which); /* 0 for an unknown id */

/* The architectures (general.architecture values) this library runs, e.g. "llama", by index
 * 0 .. pie_arch_count()-1; pie_arch_name returns NULL outside that range. */
PIE_API int32_t     pie_arch_count(void);
PIE_API const char *pie_arch_name(int32_t index);

/* ------------------------------------------------------------------------------------------ */
/* Logging                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef enum { PIE_LOG_DEBUG = 0, PIE_LOG_INFO = 1, PIE_LOG_WARN = 2, PIE_LOG_ERROR = 3 } pie_log_level;
typedef void (*pie_log_callback)(int32_t level, const char *message, void *user_data);

/* Routes the driver's and ggml's logs to `callback` (NULL drops them). ggml's logger is
 * process-wide, so this is the one process-wide setting of the library. */
PIE_API void pie_log_set(pie_log_callback callback, void *user_data);

/* ------------------------------------------------------------------------------------------ */
/* Model parameters and lifecycle                                                             */
/* ------------------------------------------------------------------------------------------ */

typedef enum { PIE_KV_F16 = 0, PIE_KV_Q8_0 = 1 } pie_kv_type;

/* Most devices one model spans: offload devices (local GPUs, then RPC workers' devices) and
 * the CPU, which is always last. */
#define PIE_MAX_DEVICES 16

typedef struct {
    int32_t n_threads;        /* CPU threads; <= 0 means "auto": the cores this process may use
                                 (physical cores, CPU affinity, cgroup quota), fewer while other
                                 processes load them (pie_model_threads says how many now); an
                                 explicit count is kept, except that more than the CPUs online
                                 run as many as there are, with a logged warning             */
    char    device[32];       /* "auto", "cpu", "cuda:N", "metal" (any ggml device name)       */
    int32_t page_size;        /* tokens per KV page (default 32)                               */
    int32_t n_pages;          /* pages in the pool (default 256)                               */
    int32_t kv_type;          /* pie_kv_type (default PIE_KV_F16)                              */
    int32_t max_batch_tokens; /* most tokens one pie_forward may carry (default 512)           */
    int32_t max_batch_kv;     /* most KV rows one pie_forward may attend over, summed over its
                                 requests (default 0 = page_size * n_pages)                     */
    int32_t use_mmap;         /* map the file where the backend allows (default 1)             */
    int32_t repack;           /* on the CPU, store the matrices ggml's CPU_REPACK kernels take
                                 interleaved for them (copied, not mapped); the load probes each
                                 weight and logs why repacking is on or off (default 1)       */
    int32_t own_kernels;      /* on x86 CPUs with AVX-512, the driver's own CPU kernels instead
                                 of ggml's: q8_0, q5_0, q4_K and q6_K products (with VNNI;
                                 ggml's integer dots, summed in another float order; those
                                 matrices are then not repacked) and attention over an f16
                                 KV pool (read in place, summed in float32 where ggml sums V in
                                 fp16). Batch-invariant and much faster for batches; 0 = ggml's
                                 kernels everywhere, as llama.cpp runs them (default 1)        */
    int32_t n_gpu_layers;     /* layers on the offload devices (GPUs, RPC workers), counted from
                                 the last; n_layer + 1 puts the output head there too; 0 = all on
                                 the CPU; -1 = as many as fit in their free memory (default)    */
    char    rpc[256];         /* "host:port[,host:port...]": RPC workers whose devices join the
                                 offload devices (after the local ones); "" = none              */
    float   tensor_split[PIE_MAX_DEVICES]; /* share of the offloaded layers per offload device,
                                 in the order pie_model_devices lists them; all 0 = by free
                                 memory                                                          */
} pie_model_params;

PIE_API pie_model_params pie_model_default_params(void);

typedef struct pie_model pie_model; /* opaque */

PIE_API int32_t pie_model_load(const char *path, const pie_model_params *params, pie_model **out_model);
PIE_API void    pie_model_free(pie_model *model);

typedef struct {
    char    arch[32];          /* general.architecture, e.g. "gemma3"                          */
    char    name[128];         /* general.name, or ""                                          */
    char    backend[64];       /* ggml device the graph runs on, e.g. "CPU", "CUDA0"           */
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
    int32_t sliding_window;    /* 0 when the model has no sliding-window layers                */
    int32_t page_size;
    int32_t n_pages;
    int32_t kv_type;
    int32_t max_batch_tokens;
    int64_t n_params;
    int64_t weight_bytes;
    int64_t kv_bytes;          /* all pages, all layers, K and V                                */
    int64_t page_bytes;        /* bytes of one page as read by pie_read_pages                  */
    int32_t n_repacked;        /* weights stored for ggml's CPU_REPACK kernels (0: repack off)  */
    int32_t embedding_only;    /* 1: an embedding model (bert, nomic-bert, gemma-embedding):
                                  bidirectional attention, no LM head; each request brings its
                                  whole input in one pass and asks for hidden states only      */
} pie_model_info;

PIE_API int32_t pie_model_get_info(const pie_model *model, pie_model_info *out_info);

/* The CPU threads the next pie_forward runs (changes over time with n_threads "auto"). */
PIE_API int32_t pie_model_threads(const pie_model *model);

/* ------------------------------------------------------------------------------------------ */
/* Placement: which device holds what                                                         */
/* ------------------------------------------------------------------------------------------ */

/*
 * As llama.cpp places a model: the last n_gpu_layers layers (weights and their KV pages) go to
 * the offload devices, split between them by tensor_split or their free memory, the rest to
 * the CPU; the token embeddings stay on the CPU (a row lookup gains nothing from a device);
 * the output norm and head go with layer n_layer, i.e. offloaded when n_gpu_layers > n_layer.
 * Ops run where their weights are; an op a device lacks runs on the CPU.
 */
typedef struct {
    char    name[64];          /* ggml device name ("CPU", "CUDA0", "MTL0") or "RPC host:port" */
    char    description[128];
    int32_t is_cpu;
    int32_t first_layer;       /* its layers are first_layer .. first_layer + n_layers - 1     */
    int32_t n_layers;
    int32_t input;             /* the token embeddings are here                                */
    int32_t output;            /* the output norm and head are here                            */
    int64_t weight_bytes;
    int64_t kv_bytes;
    int64_t compute_bytes;     /* compute buffers reserved at load (0 in a plan); on the CPU
                                  address space, committed as batches touch it                 */
    int64_t free_bytes;        /* device memory as ggml reported it when the model was placed   */
    int64_t total_bytes;
} pie_device_use;

/* The devices of a loaded model, offload devices first, the CPU last: *n_out entries (at most
 * `cap` are written). */
PIE_API int32_t pie_model_devices(const pie_model *model, pie_device_use *out, int32_t cap, int32_t *n_out);

/* The same placement computed from the file's metadata without loading it (nothing is
 * allocated; RPC workers are asked for their memory). */
PIE_API int32_t pie_plan_devices(const char *path, const pie_model_params *params, pie_device_use *out, int32_t cap,
                                 int32_t *n_out);

/* ------------------------------------------------------------------------------------------ */
/* RPC workers (ggml's RPC backend)                                                           */
/* ------------------------------------------------------------------------------------------ */

/* 1 when the installed ggml has its RPC backend (llama-cpp-python built with -DGGML_RPC=ON). */
PIE_API int32_t pie_rpc_available(void);

/* The ggml RPC protocol version this ggml speaks, "major.minor.patch". */
PIE_API const char *pie_rpc_version(void);

/*
 * Serves this machine's devices (every GPU, then the CPU with n_threads threads) to RPC
 * clients at endpoint "host:port", one client at a time, until the process ends; returns only
 * when it cannot start (no RPC backend, bad endpoint, port taken). ggml's RPC protocol has no
 * authentication: anyone who reaches the port can run code paths of ggml on this machine.
 */
PIE_API int32_t pie_rpc_serve(const char *endpoint, int32_t n_threads);

/*
 * A model that uses RPC workers runs every call on a helper thread: ggml's RPC client aborts
 * the process when a worker's connection drops, and the driver turns that abort into
 * PIE_ERR_BACKEND for the call instead (naming the worker). Such a model is unusable after
 * that: every later call fails the same way; pie_model_free then releases only what no ggml
 * thread still holds. A dropped connection is seen at once; a worker whose machine vanishes
 * without closing the connection is not (TCP gives no sign).
 */

/* ------------------------------------------------------------------------------------------ */
/* Sampling                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* temperature <= 0 is greedy (argmax; ties go to the lowest id). Otherwise logits are divided
 * by temperature and filtered in this order: top_k (0 = off), top_p (1 = off), min_p (0 = off),
 * then one token is drawn with a generator seeded by `seed`: the same seed and logits give
 * the same token. */
typedef struct {
    float    temperature;
    int32_t  top_k;
    float    top_p;
    float    min_p;
    uint64_t seed;
} pie_sampler;

/* ------------------------------------------------------------------------------------------ */
/* The batched forward call                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* What pie_forward returns besides the sampled token (always written). */
enum {
    PIE_RETURN_LOGPROB = 1 << 0, /* out_logprobs[i]: log p(sampled token), softmax of raw logits */
    PIE_RETURN_TOP_K   = 1 << 1, /* out_top_ids/out_top_probs[i*top_k ...], softmax of raw logits,
                                    sorted by descending probability                            */
    PIE_RETURN_LOGITS  = 1 << 2, /* out_logits[i*n_vocab ...], raw (before bitmask)             */
    PIE_RETURN_HIDDEN  = 1 << 3, /* out_hidden[i*n_embd ...], final hidden state after the
                                    output norm                                                 */
    PIE_RETURN_HIDDEN_ONLY = 1 << 4, /* with PIE_RETURN_HIDDEN (embeddings): the pass stops at the
                                    hidden state: no LM head, nothing sampled (samplers and
                                    out_tokens may be NULL and are not read or written); no other
                                    flag and no logit_masks                                     */
};

/*
 * One forward pass over n_requests requests, in CSR form (FlashInfer conventions):
 *
 *   request r owns tokens[qo_indptr[r] .. qo_indptr[r+1]) with their positions (RoPE uses
 *   the given positions verbatim);
 *   its KV after this pass is its pages kv_page_indices[kv_page_indptr[r] .. kv_page_indptr[r+1])
 *   in order, the last one filled to kv_last_page_len[r] (1 .. page_size), so
 *       kv_len[r] = (n_pages_r - 1) * page_size + kv_last_page_len[r];
 *   the request's new tokens are the last n_r of that KV and are written there.
 *
 * Attention: new token i of request r sits at KV index kv_len[r] - n_r + i and never attends
 * to a larger index (causality always holds). Sliding-window layers also hide indices
 * <= own index - window. An optional custom mask narrows this further, per token, as BRLE:
 * mask_runs[mask_indptr[t] .. mask_indptr[t+1]) are run lengths over the request's KV indices
 * 0 .. kv_len[r]-1, alternating masked / visible and starting with a masked run (write a
 * leading 0 to start visible); the runs must sum to kv_len[r]. An empty range means "no custom
 * mask" for that token. mask_indptr == NULL means no custom masks at all.
 *
 * Batch invariance: a request's results (its outputs and the KV it writes) depend only on its own
 * tokens, positions, KV, mask and samplers, and on how many tokens and sampled rows it brings to
 * the pass, never on the other requests of the batch or where its pages lie: bit for bit on the
 * CPU backend. (Splitting a request's prefill into other chunks may change the last bits.)
 *
 * A request reads only its own KV: a batch where one request's KV includes a row another request
 * of the batch writes is refused (share pages only where nobody writes).
 *
 * Outputs: for each i < n_outputs, row output_rows[i] (an index into tokens) is sampled with
 * samplers[i]. logit_masks, when not NULL, holds n_outputs rows of ceil(n_vocab/32) words;
 * bit (id % 32) of word (id / 32) set = token allowed. The caller owns all output buffers.
 *
 * A row that cannot be sampled (no logit its mask allows is finite: e.g. NaN from the model)
 * fails on its own when out_status is set: out_status[i] = its status, out_tokens[i] = -1, its
 * message in out_errors[i * PIE_ROW_ERROR_SIZE ...] (when set); the call succeeds and every
 * other row is returned. Without out_status such a row fails the whole call.
 */
#define PIE_ROW_ERROR_SIZE 160

typedef struct {
    /* inputs */
    int32_t         n_tokens;
    const int32_t  *tokens;            /* [n_tokens]                                          */
    const int32_t  *positions;         /* [n_tokens]                                          */
    int32_t         n_requests;
    const int32_t  *qo_indptr;         /* [n_requests + 1], qo_indptr[0] = 0, last = n_tokens  */
    const int32_t  *kv_page_indices;   /* [kv_page_indptr[n_requests]]                         */
    const int32_t  *kv_page_indptr;    /* [n_requests + 1]                                     */
    const int32_t  *kv_last_page_len;  /* [n_requests]                                         */
    const int32_t  *mask_indptr;       /* [n_tokens + 1] or NULL                               */
    const int32_t  *mask_runs;         /* [mask_indptr[n_tokens]]                              */

    /* what to sample */
    int32_t            n_outputs;
    const int32_t     *output_rows;    /* [n_outputs], each in [0, n_tokens)                   */
    const pie_sampler *samplers;       /* [n_outputs]                                          */
    const uint32_t    *logit_masks;    /* [n_outputs * ceil(n_vocab/32)] or NULL               */

    /* what to return */
    uint32_t  return_flags;            /* PIE_RETURN_* bits                                    */
    int32_t   top_k;                   /* entries per row for PIE_RETURN_TOP_K                 */
    int32_t  *out_tokens;              /* [n_outputs], always written                          */
    float    *out_logprobs;            /* [n_outputs]                                          */
    int32_t  *out_top_ids;             /* [n_outputs * top_k]                                  */
    float    *out_top_probs;           /* [n_outputs * top_k]                                  */
    float    *out_logits;              /* [n_outputs * n_vocab]                                */
    float    *out_hidden;              /* [n_outputs * n_embd]                                 */
    int32_t  *out_status;              /* [n_outputs] or NULL: PIE_OK or why row i failed       */
    char     *out_errors;              /* [n_outputs * PIE_ROW_ERROR_SIZE] or NULL: row i's
                                          message ("" when it succeeded), with out_status       */
} pie_batch;

/* Runs one batch. Every index, length and mask is validated before anything is computed, and a
 * batch that fails validation or allocation leaves the KV pool as it was. A failure after that
 * (the backend failing to compute, or a row that cannot be sampled without out_status) may have
 * written the batch's new KV rows: only rows of the batch's own pages at the positions its new
 * tokens take, never anything else. Not thread-safe per model: one call at a time. */
PIE_API int32_t pie_forward(pie_model *model, const pie_batch *batch);

/* ------------------------------------------------------------------------------------------ */
/* Page operations                                                                            */
/* ------------------------------------------------------------------------------------------ */

/* Copies the full content of page src[i] to page dst[i], all layers, K and V. */
PIE_API int32_t pie_copy_pages(pie_model *model, int32_t n, const int32_t *src, const int32_t *dst);

/* Reads n pages into host memory: `dst` holds n * page_bytes bytes (pie_model_info.page_bytes),
 * page after page, in the driver's own layout (only meaningful to pie_write_pages of a model
 * with the same info). */
PIE_API int32_t pie_read_pages(pie_model *model, int32_t n, const int32_t *pages, void *dst, size_t dst_bytes);

/* Writes pages back from the layout pie_read_pages produced. */
PIE_API int32_t pie_write_pages(pie_model *model, int32_t n, const int32_t *pages, const void *src, size_t src_bytes);

/* ------------------------------------------------------------------------------------------ */
/* Debugging: activations                                                                     */
/* ------------------------------------------------------------------------------------------ */

/*
 * Intermediate tensors of a forward pass carry llama.cpp's names, so they compare with its
 * activations name by name: "<name>-<layer>" for "attn_norm", "Qcur", "Kcur", "Vcur",
 * "kqv_out", "attn_out", "ffn_norm", "ffn_out", "l_out" (and per family "Qcur_normed",
 * "ffn_inp", "sa_out", ...), then "result_norm" and "result_output" (the logits).
 *
 * While a callback is set, pie_forward asks it about each f32 tensor of the graph with
 * data == NULL; a non-zero answer asks for that tensor's values, and once they are computed
 * the callback is called again with `data`: ne[0] * ne[1] * ne[2] * ne[3] floats, ne[0]
 * fastest, a host copy valid during the call (the answer is ignored then). Each tensor asked
 * for splits the computation, so passes get slower; their results do not change.
 * NULL turns it off. The setting belongs to the model.
 */
typedef int32_t (*pie_activation_callback)(const char *name, const int64_t *ne, const float *data, void *user_data);
PIE_API int32_t pie_set_activation_callback(pie_model *model, pie_activation_callback callback, void *user_data);

#ifdef __cplusplus
}
#endif

#endif /* PIE_DRIVER_H */
