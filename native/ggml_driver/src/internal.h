/*
 * internal.h — the driver's private types, shared by its C files (never installed).
 *
 * A pie_model owns: hyper-parameters (pie_hparams), weight tensors (pie_weights), the paged KV
 * pool (pie_kv_pool), the ggml backend scheduler that runs graphs, and host scratch reused by
 * every pie_forward (pie_plan). Reading order: hparams, weights, KV pool, plan, model, helpers.
 */
#ifndef PIE_INTERNAL_H
#define PIE_INTERNAL_H

#include "pie_driver.h"
#include "sampler.h"
#include "status.h"
#include "threads.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

#include <stdbool.h>

#define PIE_MAX_LAYERS 256
#define PIE_MAX_EXPERTS 1024 /* llama.cpp's limit */

/* ------------------------------------------------------------------------------------------ */
/* Hyper-parameters                                                                           */
/* ------------------------------------------------------------------------------------------ */

typedef struct pie_arch pie_arch;
typedef struct pie_q8_store pie_q8_store;     /* matmul_q8.c */
typedef struct pie_attn_store pie_attn_store; /* attention_cpu.c */

typedef struct {
    const pie_arch *arch;
    char    name[128];
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_ff;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;        /* per-head size of Q and K                                       */
    int32_t head_dim_v;      /* per-head size of V                                             */
    int32_t n_rot;           /* rotary dims per head                                           */
    int32_t rope_mode;       /* GGML_ROPE_TYPE_NEOX or 0 (normal)                               */
    float   rope_base;       /* global layers                                                  */
    float   rope_scale;      /* 1 / scaling factor, global layers                              */
    float   rope_base_swa;   /* sliding-window layers                                          */
    float   rope_scale_swa;  /* sliding-window layers' 1 / factor (1: unscaled unless the family scales them: gemma2, gpt-oss) */
    float   rope_ext_factor; /* YaRN: 1, else 0 (ggml_rope_ext's ext_factor)                   */
    float   rope_attn_factor;/* ggml_rope_ext's attn_factor                                    */
    float   rope_ext_factor_swa, rope_attn_factor_swa; /* the same for sliding-window layers    */
    float   rope_beta_fast;  /* YaRN's correction range (ggml_rope_ext's beta_fast, beta_slow)  */
    float   rope_beta_slow;
    int32_t rope_n_ctx_orig; /* the context YaRN extends (ggml_rope_ext's n_ctx_orig)          */
    bool    longrope;        /* rope.scaling.type "longrope": per-context frequency factors     */
    bool    no_rope[PIE_MAX_LAYERS]; /* layers whose Q and K are not rotated (SmolLM3, Granite) */
    float   rms_eps;
    float   attn_scale;      /* multiplies Q.K                                                 */
    float   embd_scale;      /* multiplies token embeddings (gemma: sqrt(n_embd))              */
    bool    embd_scale_input;/* the scale is part of the input embedding "embd" (granite), not a
                                step after it ("inp_scaled", gemma)                            */
    float   residual_scale;  /* multiplies each block's output before the residual add (1 = off) */
    float   logit_scale;     /* divides the logits (1 = off)                                   */
    float   logit_softcap;   /* 0 = off                                                        */
    float   attn_softcap;    /* caps Q.K (cap * tanh(x / cap)) before the softmax; 0 = off     */
    float   attn_temp_scale; /* Llama 4 style attention temperature: Q of the token at position p
                                times 1 + attn_temp_scale * log(floor(p / attn_temp_floor) + 1);
                                0 = off                                                        */
    int32_t attn_temp_floor;
    int32_t sliding_window;  /* 0 = none                                                       */
    bool    is_swa[PIE_MAX_LAYERS];
    /* mixture of experts (0 experts = a dense FFN; see models/moe.c) */
    int32_t n_expert;        /* experts per MoE layer                                          */
    int32_t n_expert_used;   /* experts each token is routed to (top-k)                        */
    int32_t n_ff_exp;        /* hidden width of one expert                                     */
    int32_t n_ff_shexp;      /* hidden width of the shared expert (qwen2moe)                   */
    /* encoders (models/bert.c) */
    float   norm_eps;        /* LayerNorm epsilon (attention.layer_norm_epsilon)               */
    int32_t n_pos;           /* rows of the position embeddings: positions must stay below it; 0 =
                                no table, any position                                          */
    /* KV sharing (gemma3n): layers 0 .. n_layer_kv - 1 own their KV; each later layer il writes
     * none and attends over layer kv_layer[il]'s (kv_layer[il] == il for layers that own KV) */
    int32_t n_layer_kv;
    int32_t kv_layer[PIE_MAX_LAYERS];
    /* gemma3n (models/gemma3n.c): AltUp streams, per-layer input width, LAuReL rank, and the
     * layers whose FFN gate keeps only values above mean + sparse_std[il] * std (Gaussian top-k) */
    int32_t n_altup;
    int32_t i_altup_act;     /* the stream the layers compute on                               */
    int32_t n_embd_altup;    /* width of each layer's per-layer input                          */
    int32_t laurel_rank;
    bool    sparse_ffn[PIE_MAX_LAYERS];
    float   sparse_std[PIE_MAX_LAYERS];
} pie_hparams;

/* ------------------------------------------------------------------------------------------ */
/* Weights (NULL = absent in the file)                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    struct ggml_tensor *attn_norm, *wq, *wk, *wv, *wo, *bq, *bk, *bv, *bo;
    struct ggml_tensor *wqkv, *bqkv;  /* fused Q|K|V (then wq, wk, wv are NULL)                */
    struct ggml_tensor *q_norm, *k_norm, *attn_post_norm;
    struct ggml_tensor *ffn_norm, *ffn_gate, *ffn_up, *ffn_down, *ffn_post_norm;
    struct ggml_tensor *ffn_gate_b, *ffn_up_b, *ffn_down_b;
    /* ffn_gate NULL with PIE_FUSED_GATE_UP: ffn_up is [n_embd, 2 * n_ff], gate half first     */
    /* mixture of experts: router [n_embd, n_expert]; experts gate/up [n_embd, n_ff_exp, n_expert],
     * down [n_ff_exp, n_embd, n_expert]; shared expert (gate_inp_shexp [n_embd]) */
    struct ggml_tensor *ffn_gate_inp, *ffn_gate_exps, *ffn_up_exps, *ffn_down_exps;
    struct ggml_tensor *ffn_gate_inp_shexp, *ffn_gate_shexp, *ffn_up_shexp, *ffn_down_shexp;
    /* gpt-oss: biases of router [n_expert] and experts (gate/up [n_ff_exp, n_expert], down
     * [n_embd, n_expert]); attention sinks [n_head] */
    struct ggml_tensor *ffn_gate_inp_b, *ffn_gate_exps_b, *ffn_up_exps_b, *ffn_down_exps_b;
    struct ggml_tensor *attn_sinks;
    /* BERT-style post-norms (LayerNorm with bias) after the attention and FFN residual adds */
    struct ggml_tensor *attn_out_norm, *attn_out_norm_b, *layer_out_norm, *layer_out_norm_b;
    /* gemma3n: per-layer input gate [n_embd, n_embd_altup], projection [n_embd_altup, n_embd] and
     * its post-norm [n_embd]; AltUp correction coefficients [n_altup, n_altup] and scale [n_embd],
     * prediction coefficients [n_altup, n_altup^2], router [n_embd, n_altup] and its norm [n_embd];
     * LAuReL's low-rank pair [n_embd, rank], [rank, n_embd] and its post-norm [n_embd] */
    struct ggml_tensor *inp_gate, *proj, *post_norm;
    struct ggml_tensor *altup_correct_coef, *altup_correct_scale, *altup_predict_coef, *altup_router, *altup_router_norm;
    struct ggml_tensor *laurel_l, *laurel_r, *laurel_post_norm;
} pie_layer;

typedef struct {
    struct ggml_tensor *tok_embd;    /* [n_embd, n_vocab]                                      */
    struct ggml_tensor *output_norm; /* [n_embd]                                               */
    struct ggml_tensor *output;      /* [n_embd, n_vocab], = tok_embd when tied                */
    struct ggml_tensor *rope_freqs;  /* [n_rot/2] or NULL: frequency factors (llama 3.1 style, or
                                        LongRoPE's long or short set, chosen at load)          */
    /* gemma3n: per-layer token embeddings [n_embd_altup * n_layer, n_vocab], the projection of
     * the input to per-layer inputs [n_embd, n_embd_altup * n_layer] and its norm [n_embd_altup];
     * AltUp's projections into and out of the extra streams [n_embd, n_embd, n_altup - 1] */
    struct ggml_tensor *per_layer_tok_embd, *per_layer_model_proj, *per_layer_proj_norm;
    struct ggml_tensor *altup_proj, *altup_unembd_proj;
    pie_layer layers[PIE_MAX_LAYERS];
    /* encoders (models/bert.c); NULL elsewhere */
    struct ggml_tensor *pos_embd;    /* [n_embd, n_pos] absolute position embeddings (bert)    */
    struct ggml_tensor *type_embd;   /* [n_embd, n_types] token types; row 0 is added          */
    struct ggml_tensor *embd_norm, *embd_norm_b; /* [n_embd] LayerNorm of the input embedding  */
    /* sentence-transformers dense projections after the output norm (gemma-embedding), NULL =
       none: dense_2 [n_embd, d], dense_3 [d, n_embd] */
    struct ggml_tensor *dense_2, *dense_3;
} pie_weights;

/* ------------------------------------------------------------------------------------------ */
/* Paged KV pool: per layer one flat K and one flat V tensor over n_pages * page_size rows      */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    int32_t page_size;
    int32_t n_pages;
    enum ggml_type type;
    struct ggml_context  *ctx;
    struct ggml_tensor   *k[PIE_MAX_LAYERS]; /* [head_dim   * n_head_kv, n_pages * page_size] */
    struct ggml_tensor   *v[PIE_MAX_LAYERS]; /* [head_dim_v * n_head_kv, n_pages * page_size] */
    size_t   page_bytes;                     /* all layers, K and V, one page                  */
    int64_t  total_bytes;
} pie_kv_pool;

/* ------------------------------------------------------------------------------------------ */
/* Devices: where each layer lives (placement.c) and the RPC workers among them (rpc.c)       */
/* ------------------------------------------------------------------------------------------ */

#define PIE_RPC_ENDPOINT 128 /* "host:port" as given, or as spelled for ggml                   */
#define PIE_MAX_BUFFERS  64  /* weight and KV buffers over all devices                         */

typedef struct {
    int32_t  n;                                         /* workers                             */
    char     endpoint[PIE_MAX_DEVICES][PIE_RPC_ENDPOINT]; /* as given                          */
    char     spelled[PIE_MAX_DEVICES][PIE_RPC_ENDPOINT];  /* as handed to ggml (rpc.c)         */
    int32_t  dev_worker[PIE_MAX_DEVICES];               /* the worker of each RPC device       */
    uint64_t failures;                                  /* RPC failures in this process seen   */
    bool     dead;                                      /* a worker was lost: every call fails */
    char     why[512];
} pie_rpc;

typedef struct {
    int32_t n_dev;                                 /* offload devices, then the CPU (n_dev - 1)  */
    ggml_backend_dev_t dev[PIE_MAX_DEVICES];
    ggml_backend_t     backend[PIE_MAX_DEVICES];   /* one per device, in the scheduler's order   */
    char    name[PIE_MAX_DEVICES][64];             /* "CPU", "CUDA0", "RPC host:port"            */
    int64_t free_bytes[PIE_MAX_DEVICES], total_bytes[PIE_MAX_DEVICES];
    int64_t weight_bytes[PIE_MAX_DEVICES], kv_bytes[PIE_MAX_DEVICES], compute_bytes[PIE_MAX_DEVICES];
    int8_t  layer_dev[PIE_MAX_LAYERS];             /* device of each layer's weights and KV      */
    int8_t  output_dev;                            /* device of the output norm and head         */
    int32_t n_gpu_layers;                          /* as resolved (-1 became a count)            */
    int32_t n_buf;
    ggml_backend_buffer_t buf[PIE_MAX_BUFFERS];    /* every weight and KV buffer                 */
    struct ggml_context *ctx_dup;                  /* the tied head's copy on its device, or NULL */
    const struct ggml_tensor *dup_src;             /* the file tensor it copies                  */
    pie_rpc rpc;
} pie_placement;

/* ------------------------------------------------------------------------------------------ */
/* Batch invariance of matrix products                                                        */
/* ------------------------------------------------------------------------------------------ */

/* ggml's CPU backend picks a matrix product's kernel by the number of columns (token rows) it
 * multiplies, and its kernels sum in different orders, so a token's values would depend on how
 * many other tokens share its batch. Within one kernel every column is summed on its own. So a
 * request's rows always take the kernel its own size picks: the rows of a request with at least
 * PIE_WIDE_ROWS tokens ("wide") go through products of at least that many columns, the others
 * ("narrow") through products few enough for vec_dot, ggml's column-by-column kernel (see
 * pie_matmul). 16: ggml's tiled k-quant kernel starts at 8 columns but beats vec_dot from ~16.
 * Expert products (mul_mat_id) switch per expert, by the rows the whole product sends it: there
 * a wide request's rows are multiplied on their own (pie_matmul_id).
 * A layout lists the rows a product multiplies as spans of one kind, in order; a wide span holds
 * one request's rows (a repacked weight's gemm takes columns in groups of 4 from a product's
 * first, so a wide request's product starts at its own first row, as when it is alone). */
#define PIE_WIDE_ROWS 16

typedef struct {
    int32_t start, len;
    bool    wide;
    int32_t req;        /* the request of its last row; a wide span holds one request's rows */
} pie_span;

typedef struct {
    int32_t   n_spans;
    int32_t   n_pieces; /* the most products one weight takes over these rows (pie_matmul)   */
    pie_span *spans;
    size_t    cap;
} pie_layout;

/* ------------------------------------------------------------------------------------------ */
/* Plan: a validated batch turned into graph inputs (host scratch, grown on demand)            */
/* ------------------------------------------------------------------------------------------ */

/* Most runs of consecutive pages a request's KV is copied together from (a row copy per run)
 * before the plan gathers its rows instead. Each run adds copy nodes to every layer, each a
 * barrier of the CPU threads, and a forked stream's runs grow with its KV (its pages interleave
 * with its siblings'), changing the graph every few steps: from three runs on, one gather per
 * layer is cheaper (8 forks over a 640-token KV: 137 -> 83 ms per step). */
#define PIE_MAX_KV_RUNS 2

/* Pool rows start .. start + len: part of a request's KV that lies consecutively in the pool. */
typedef struct {
    int32_t start, len;
} pie_kv_run;

/* One request's slice of the batch. */
typedef struct {
    int32_t q0, n_q;       /* its tokens: batch rows q0 .. q0 + n_q                          */
    int32_t n_kv;          /* its KV length after this pass                                   */
    int32_t n_runs;        /* > 0: its KV lies in that many runs of consecutive pages;
                              0: too many, its rows are gathered                              */
    int32_t run_off;       /* its runs: req_runs[run_off ..]                                  */
} pie_plan_req;

/* Most query rows of an attention group of several requests: ggml's CPU flash attention takes
 * its tiled kernel from 64 rows, which sums in another order. */
#define PIE_GROUP_ROWS 32

/* The KV length from which ggml's CPU flash attention splits a single query's KV over the
 * threads (its split-KV path, which sums in another order): a lone query attending over at
 * least this many rows is given a dummy second row, so every query takes the same kernel. */
#define PIE_SPLIT_KV_ROWS 512

/* Most runs of pages a member of a group may have (each run of a member is one copy per layer). */
#define PIE_MAX_MEMBER_RUNS 4

/*
 * One flash-attention call: a request alone, or consecutive decode-sized requests whose KV
 * starts with the same pages (forks of one prefix, clients of one cached system prompt). A
 * group's KV is that shared part once, then each member's own rows; each member's mask rows see
 * its own KV in its order and hide the other members' rows, which the kernel skips without a
 * trace, so a request's result never depends on what else is in the batch or where its pages
 * lie, and the shared rows are copied once per layer instead of once per member.
 */
typedef struct {
    int32_t r0, n_req;     /* its members: requests r0 .. r0 + n_req                          */
    int32_t shared;        /* rows at the start of every member's KV they share (0: alone)     */
    int32_t q0, n_q;       /* the members' tokens: batch rows q0 .. q0 + n_q                  */
    int32_t n_kv;          /* KV rows it attends over                                         */
    int32_t n_runs;        /* > 0: its KV is runs[run_off ..] in order (one run: a view of the
                              pool; more: the runs copied into one tensor);
                              0: its rows are gathered from gather_rows[gather_off ..]         */
    int32_t run_off;
    int32_t gather_off;
    bool    pad;           /* a lone query with a dummy second row (PIE_SPLIT_KV_ROWS)        */
    int64_t mask_off;      /* its [n_q + pad, n_kv] mask block inside mask / mask_swa         */
} pie_plan_group;

typedef struct {
    int32_t n_tokens;
    int32_t n_requests;
    int32_t n_outputs;       /* rows kept after the last layer (>= 1; a dummy row when none)   */
    bool    head;            /* run the LM head (the batch samples something)                  */
    int32_t n_runs;          /* entries of runs                                                */
    int32_t n_gather;        /* entries of gather_rows                                         */
    int64_t n_mask;          /* entries of mask (sum of n_q * n_kv)                            */
    bool    any_swa_mask;    /* a sliding window hides something in this batch                 */
    int32_t n_groups;        /* attention groups                                               */
    pie_plan_req *reqs;      /* [n_requests]                                                   */
    pie_plan_group *groups;  /* [n_groups]                                                     */
    int64_t *write_rows;     /* [n_tokens] pool row each new token's K/V goes to               */
    pie_kv_run *req_runs;    /* each request's runs, request after request                     */
    pie_kv_run *runs;        /* [n_runs] the groups' KV runs, group after group                */
    int32_t *gather_rows;    /* [n_gather] pool rows of the gathered groups' KV, in order      */
    ggml_fp16_t *mask;       /* [n_mask] per group [n_q + pad, n_kv]: 0 = attend, -inf = hidden */
    ggml_fp16_t *mask_swa;   /* [n_mask] the same with the sliding window applied             */
    int32_t *out_rows;       /* [n_outputs]                                                    */
    pie_layout token_layout; /* the batch's rows by request size                               */
    pie_layout output_layout;/* the sampled rows by how many rows their request samples        */
    int32_t *out_req;        /* [n_outputs] the request of each sampled row                    */
    int32_t *req_outputs;    /* [n_requests] rows each request samples                         */
    float   *zeros;          /* [model->pad_width] zeros for the graph's zeros input           */
    float   *attn_temp;      /* [cap_attn_temp] the graph's attn_temp input                    */
    size_t   cap_attn_temp;
    /* capacities */
    size_t cap_reqs, cap_tokens, cap_runs, cap_gather, cap_mask, cap_mask_swa, cap_out, cap_out_req, cap_req_outputs;
    size_t cap_groups, cap_req_runs, cap_row, cap_row_swa;
    ggml_fp16_t *row, *row_swa; /* [cap_row] one member's mask row before it is spread over its group */
    /* validation scratch */
    int32_t *page_stamp;     /* [n_pages] last request that listed the page                    */
    int32_t *slot_writer;    /* [n_pages * page_size] the request (+ 1) writing the slot in this
                                batch, 0 for none (all 0 between batches)                      */
    int64_t *marked;         /* [max_batch_tokens] the slots slot_writer marks, to unmark       */
    int32_t  n_marked;
} pie_plan;

/* ------------------------------------------------------------------------------------------ */
/* The model                                                                                  */
/* ------------------------------------------------------------------------------------------ */

struct pie_model {
    pie_model_params params;
    pie_hparams      hp;
    pie_weights      w;
    pie_kv_pool      kv;
    pie_plan         plan;

    pie_placement    place;

    /* weights */
    struct ggml_context  *ctx_w;
    ggml_backend_buffer_t buf_repack; /* the CPU_REPACK weights (one of place.buf, not owned here), or NULL */
    int32_t n_repacked;               /* matrices stored there (loader.c)                        */
    pie_attn_store *attn_cpu;         /* attention on the CPU takes attention_cpu.c's kernel, its
                                         scratch here (params.own_kernels and an AVX-512 CPU;
                                         driver.c), else NULL                                     */
    pie_q8_store *q8;                 /* q8_0 / q5_0 products on the CPU take matmul_q8.c's kernels,
                                         which keep their prepared matrices here (params.own_kernels
                                         and an AVX-512 VNNI CPU; driver.c), else NULL           */
    void   *map_addr;  /* mmap of the file when weights are used in place, else NULL          */
    size_t  map_size;
    int64_t n_params;
    int64_t weight_bytes;
    int64_t pad_width;  /* widest input of a matrix whose one-column products get a zero second
                           column (pie_kernel_switch == 2); 0 when there is none              */
    int32_t split_cols; /* fewest columns of a narrow piece of a split product (pie_kernel_switch
                           - 1, the least over the matrices it splits; sizes graphs); 0 when
                           none splits                                                        */

    /* compute: the scheduler over place.backend, the CPU last */
    ggml_backend_sched_t  sched;
    pie_threads           threads;      /* CPU threads per pass, adapted under "auto"           */
    uint8_t *graph_meta;                /* tensor + graph metadata for one forward graph        */
    size_t   graph_meta_size;
    size_t   graph_cap;                 /* most graph nodes sched and graph_meta are sized for  */
    char     backend_name[64];

    /* debugging: activations handed to the host (pie_set_activation_callback), NULL = off */
    pie_activation_callback activation_cb;
    void   *activation_user;

    /* outputs */
    pie_sampler_scratch *sampler;
    float  *logits;                     /* [logits_cap] sampled rows' logits when the caller did
                                           not ask for them (grown to the largest batch seen)  */
    size_t  logits_cap;
};

/* ------------------------------------------------------------------------------------------ */
/* Architectures: the table in arch.c, one graph builder per family in models/<family>.c     */
/* ------------------------------------------------------------------------------------------ */

/* Graph inputs of one forward pass, created by pie_graph_begin. */
typedef struct {
    struct ggml_context *ctx;
    struct ggml_cgraph  *gf;
    const pie_model     *model;
    const pie_plan      *plan;
    int32_t n_tokens, n_outputs;
    struct ggml_tensor *tokens;     /* I32 [n_tokens]                                          */
    struct ggml_tensor *positions;  /* I32 [n_tokens]                                          */
    struct ggml_tensor *write_rows; /* I64 [n_tokens]                                          */
    struct ggml_tensor *gather_rows;/* I32 [n_gather], NULL when every request is a view       */
    struct ggml_tensor *mask;       /* F16 [n_mask]                                            */
    struct ggml_tensor *mask_swa;   /* F16 [n_mask], NULL when no window hides anything        */
    struct ggml_tensor *out_rows;   /* I32 [n_outputs]                                         */
    struct ggml_tensor *zeros;      /* F32 [model->pad_width] zeros, for pie_matmul; NULL until
                                       a product needs them                                    */
    struct ggml_tensor *attn_temp;  /* F32 [1, 1, n_tokens] per-token Q scale (hp.attn_temp_scale),
                                       NULL until a builder asks (pie_attn_temperature)         */
    const pie_layout   *layout;     /* the rows products multiply now: the batch's tokens, after
                                       pie_select_outputs the sampled rows                     */
    struct ggml_tensor *hidden;     /* F32 [n_embd, n_outputs] result: after the output norm   */
    struct ggml_tensor *logits;     /* F32 [n_vocab, n_outputs] result, NULL without plan->head */
    struct ggml_tensor *q8_input;   /* the last input pie_q8_matmul quantized, and its columns */
    struct ggml_tensor *q8_columns;
    struct ggml_tensor *q8k_input;  /* the same for k-quant weights (q8_K columns) */
    struct ggml_tensor *q8k_columns;
    /* each KV-owning layer's pool tensors after this pass's write (pie_attention), read through
     * by the layers that share them (hp.kv_layer) */
    struct ggml_tensor *kv_k[PIE_MAX_LAYERS], *kv_v[PIE_MAX_LAYERS];
} pie_graph;

/* One supported architecture: a row of the table in arch.c. */
struct pie_arch {
    const char *name;      /* general.architecture                                            */
    int32_t rope_mode;     /* GGML_ROPE_TYPE_NEOX (rotate halves) or 0 (rotate adjacent pairs) */
    uint32_t needs;        /* which optional tensors the family needs: bitwise PIE_NEED_*     */
    /* reads arch-specific keys and sets defaults the common loader does not know; may be NULL */
    int32_t (*load_hparams)(pie_hparams *hp, const struct gguf_context *gguf);
    void (*build)(pie_graph *g); /* builds hidden and logits into g                          */
    /* binds the layers' tensors in place of the decoder layout (encoders); may be NULL */
    int32_t (*bind)(struct ggml_context *meta, pie_hparams *hp, pie_weights *w);
    /* graph nodes beyond driver.c's estimate for a family with more than the usual 7 matrices a
     * layer, for products split into n_pieces (pie_matmul); may be NULL */
    size_t (*extra_nodes)(const pie_hparams *hp, size_t n_pieces);
};

enum {
    PIE_NEED_QKV_BIAS   = 1 << 0,
    PIE_NEED_QK_NORM    = 1 << 1,  /* per-head RMS norm of Q and K ([head_dim] weights)       */
    PIE_NEED_POST_NORMS = 1 << 2,  /* post_attention_norm, post_ffw_norm                       */
    PIE_QK_NORM_FULL    = 1 << 3,  /* with PIE_NEED_QK_NORM: over the whole projection (OLMo 2, OLMoE) */
    PIE_NO_PRE_NORMS    = 1 << 4,  /* no attn_norm / ffn_norm (OLMo 2)                         */
    PIE_FUSED_GATE_UP   = 1 << 5,  /* ffn_up holds gate and up (Phi-3)                         */
    PIE_FFN_BIAS        = 1 << 6,  /* optional FFN biases, used when present                   */
    PIE_LONGROPE        = 1 << 7,  /* rope_factors_long/short whatever rope.scaling.type says    */
    PIE_NO_ROPE_FACTORS = 1 << 8,  /* the graph rotates without frequency factors               */
    PIE_YARN_KEYS       = 1 << 9,  /* reads rope.scaling.yarn_beta_fast/slow, yarn_log_multiplier */
    /* mixture of experts (models/moe.c) */
    PIE_NEED_EXPERTS       = 1 << 10, /* every layer's FFN is a mixture of experts             */
    PIE_NEED_SHARED_EXPERT = 1 << 11, /* ... plus a shared expert behind a sigmoid gate          */
    PIE_MOE_NORM_WEIGHTS   = 1 << 12, /* the top-k routing weights are renormalised to sum to 1  */
    PIE_ALLOW_EXPERTS      = 1 << 13, /* experts when the file has them (expert_count > 0)      */
    PIE_NEED_OAI_MOE       = 1 << 14, /* gpt-oss: attention sinks, the post-attention norm as the
                                         FFN norm, biased router and experts, softmax over the
                                         chosen experts, swiglu_oai                             */
    /* an embedding model: attention sees the whole request both ways (a sliding window reaches
     * half its width to each side), so a request brings its whole input in one pass; no LM head,
     * so a pass only returns hidden states (PIE_RETURN_HIDDEN_ONLY) */
    PIE_NON_CAUSAL         = 1 << 15,
    PIE_NEED_ALTUP         = 1 << 16, /* gemma3n: per-layer embeddings, AltUp, LAuReL (loader.c's
                                         bind_gemma3n)                                          */
};

/* arch.c: the row named `name`, or NULL; the names as "llama, qwen2, ..." (for messages) */
const pie_arch *pie_arch_find(const char *name);
void pie_arch_list(char *buf, size_t size);

/* models/<family>.c: the builders and hooks arch.c lists */
void    pie_build_llama(pie_graph *g);
int32_t pie_granite_hparams(pie_hparams *hp, const struct gguf_context *gguf);
int32_t pie_smollm3_hparams(pie_hparams *hp, const struct gguf_context *gguf);
int32_t pie_mistral3_hparams(pie_hparams *hp, const struct gguf_context *gguf);
int32_t pie_gemma2_hparams(pie_hparams *hp, const struct gguf_context *gguf);
int32_t pie_gemma3_hparams(pie_hparams *hp, const struct gguf_context *gguf);
void    pie_build_gemma(pie_graph *g); /* gemma2, gemma3 */
void    pie_build_phi3(pie_graph *g);
int32_t pie_olmo2_hparams(pie_hparams *hp, const struct gguf_context *gguf);
void    pie_build_olmo2(pie_graph *g);
int32_t pie_qwen_moe_hparams(pie_hparams *hp, const struct gguf_context *gguf);
void    pie_build_olmoe(pie_graph *g);
int32_t pie_gpt_oss_hparams(pie_hparams *hp, const struct gguf_context *gguf);
void    pie_build_gpt_oss(pie_graph *g);
int32_t pie_gemma_embedding_hparams(pie_hparams *hp, const struct gguf_context *gguf);
int32_t pie_bert_hparams(pie_hparams *hp, const struct gguf_context *gguf);
/* binds the tensors of an encoder (bert, nomic-bert) in place of the decoder layout */
int32_t pie_bert_bind(struct ggml_context *meta, pie_hparams *hp, pie_weights *w);
void    pie_build_bert(pie_graph *g); /* bert, nomic-bert */
int32_t pie_gemma3n_hparams(pie_hparams *hp, const struct gguf_context *gguf);
void    pie_build_gemma3n(pie_graph *g);
size_t  pie_gemma3n_nodes(const pie_hparams *hp, size_t n_pieces);

/* ------------------------------------------------------------------------------------------ */
/* Internal API between the driver's files                                                    */
/* ------------------------------------------------------------------------------------------ */

/* status.c, log.c: pie_set_error and pie_log, declared in status.h (the sampler uses them too) */

/* loader.c: fills hp, w, ctx_w, map_*, n_params, weight_bytes, n_repacked and places the weights on
 * the devices (place.dev set by pie_devices_open); with plan_only it stops after the placement.
 * The pie_gguf_* readers accept any integer / float storage and return false when absent. */
bool    pie_gguf_int(const struct gguf_context *gguf, const char *key, int64_t *out);
bool    pie_gguf_float(const struct gguf_context *gguf, const char *key, float *out);
/* A float key that must be finite and > 0 (>= 0 with allow_zero): PIE_ERR_FORMAT naming it
 * otherwise; *out keeps its value when the key is absent. */
int32_t pie_gguf_positive(const struct gguf_context *gguf, const char *key, bool allow_zero, float *out);
/* An integer key that may be absent (*out untouched); PIE_ERR_UNSUPPORTED naming it when it holds
 * something else (a string, a per-layer array). */
int32_t pie_gguf_int_opt(const struct gguf_context *gguf, const char *key, int64_t *out);
/* "<arch>.attention.sliding_window" (default_window when absent) and its layer pattern (an array
 * of per-layer booleans, or n: every n-th layer global, default_pattern when absent), as
 * llama.cpp's load_swa_pattern reads them; no window or a window of 0 leaves every layer global. */
int32_t pie_load_swa(pie_hparams *hp, const struct gguf_context *gguf, int64_t default_window, int64_t default_pattern);
/* Binds tensor `name` of meta with shape [ne0, ne1] (ne1 <= 0: a vector [ne0], which must be
 * f32); *out NULL when absent and not required; PIE_ERR_FORMAT naming it when missing or
 * misshapen. */
int32_t pie_bind_tensor(struct ggml_context *meta, const char *name, int64_t ne0, int64_t ne1, bool required,
                        struct ggml_tensor **out);
int32_t pie_bind_attention(struct ggml_context *meta, int il, int64_t E, int64_t Q, int64_t K, int64_t V, int64_t O,
                           bool qkv_bias, pie_layer *L);
int32_t pie_load_weights(pie_model *model, const char *path, bool plan_only);
void    pie_free_weights(pie_model *model);

/* placement.c: the devices (offload devices, then the CPU), the layers' devices, buffers on them */
int32_t pie_devices_open(pie_model *model);
int32_t pie_place_layers(pie_model *model);               /* layer_dev, output_dev, sizes   */
int     pie_tensor_device(const pie_model *model, const struct ggml_tensor *t);
/* allocates each tensor (dev[i] < 0: skipped) on device dev[i], in buffers marked `usage` */
int32_t pie_alloc_on_devices(pie_model *model, struct ggml_tensor **tensors, const int *dev, int n,
                             enum ggml_backend_buffer_usage usage);
int32_t pie_compute_open(pie_model *model, int n_threads, size_t n_nodes);  /* backends + sched */
void    pie_set_cpu_threads(pie_model *model, int n_threads);
int32_t pie_sched_new(pie_model *model, size_t n_nodes);
void    pie_devices_close(pie_model *model);
bool    pie_offloaded(const pie_model *model);          /* anything lives off the CPU       */
void    pie_placement_report(const pie_model *model, pie_device_use *out, int32_t cap, int32_t *n_out);

/* rpc.c: workers (see the comment at its top) */
int32_t pie_rpc_parse(const char *list, pie_rpc *out);
int32_t pie_rpc_connect(pie_rpc *rpc, ggml_backend_dev_t *devs, int32_t cap, int32_t *n_devs);
void    pie_rpc_release(pie_rpc *rpc);
int32_t pie_rpc_call(pie_rpc *rpc, int32_t (*fn)(void *), void *arg); /* fn(arg), guarded      */
bool    pie_rpc_on_abort(const char *message); /* log.c's abort hook; parks for an RPC abort  */

/* kv_pool.c */
int32_t pie_kv_init(pie_model *model);
void    pie_kv_free(pie_kv_pool *kv);

/* batch.c */
int32_t pie_plan_build(pie_model *model, const pie_batch *batch);
void    pie_plan_free(pie_plan *plan);

/* models/common.c: building blocks every family uses */
void pie_graph_begin(pie_graph *g);
struct ggml_tensor *pie_name(struct ggml_tensor *t, const char *name, int il);
struct ggml_tensor *pie_embed(pie_graph *g);
struct ggml_tensor *pie_select_outputs(pie_graph *g, struct ggml_tensor *x);
struct ggml_tensor *pie_norm(pie_graph *g, struct ggml_tensor *x, struct ggml_tensor *w);
struct ggml_tensor *pie_rope(pie_graph *g, struct ggml_tensor *x, int il);
void pie_qkv(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, struct ggml_tensor **q,
             struct ggml_tensor **k, struct ggml_tensor **v);
struct ggml_tensor *pie_ffn_swiglu(pie_graph *g, const pie_layer *L, struct ggml_tensor *x);
struct ggml_tensor *pie_geglu(pie_graph *g, struct ggml_tensor *gate, struct ggml_tensor *up, struct ggml_tensor *x);
struct ggml_tensor *pie_attn_temperature(pie_graph *g);
struct ggml_tensor *pie_attention(pie_graph *g, int il, struct ggml_tensor *q, struct ggml_tensor *k,
                                  struct ggml_tensor *v, float kq_scale);
struct ggml_tensor *pie_linear(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *b,
                               struct ggml_tensor *x);
struct ggml_tensor *pie_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x);
int32_t pie_kernel_switch(enum ggml_type type, bool repacked);
struct ggml_tensor *pie_matmul_id(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x, struct ggml_tensor *ids);
int32_t pie_kernel_switch_id(enum ggml_type type);
void pie_graph_finish(pie_graph *g, struct ggml_tensor *x);

bool pie_own_kernels(const pie_model *m); /* driver.c: params.own_kernels, and the CPU backend computes */

/* matmul_q8.c: q8_0, q5_0, q4_K and q6_K products on x86 CPUs with AVX-512 VNNI (params.own_kernels) */
bool pie_q8_supported(void);
bool pie_q8_takes_type(enum ggml_type type); /* the weight types these kernels multiply */
int32_t pie_q8_open(pie_model *m);
void pie_q8_free(pie_model *m);
void pie_q8_log_prepared(const pie_model *m); /* how many matrices, how much memory */
/* w x through these kernels, or NULL when they do not take w (pie_matmul then uses ggml's) */
struct ggml_tensor *pie_q8_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x);
/* gelu(gate x) * up x in one op (gate, up [n_in, n_ff]; x F32 [n_in, n] -> [n_ff, n]), or NULL */
struct ggml_tensor *pie_q8_geglu(pie_graph *g, struct ggml_tensor *gate, struct ggml_tensor *up, struct ggml_tensor *x);

/* attention_cpu.c: paged attention on x86 CPUs with AVX-512 (params.own_kernels) */
bool pie_attn_cpu_supported(void);
int32_t pie_attn_cpu_open(pie_model *m, int32_t n_threads, int64_t max_kv);
void pie_attn_cpu_free(pie_model *m);
/* [head_dim_v, n_head, n_tokens], or NULL when the kernel does not take the layer */
struct ggml_tensor *pie_attn_cpu(pie_graph *g, int il, struct ggml_tensor *q, struct ggml_tensor *kp,
                                 struct ggml_tensor *vp, float kq_scale);

/* models/moe.c: the feed-forward block (SwiGLU, or routed experts when the layer has a router);
 * x: [n_embd, n] after the FFN norm -> [n_embd, n] */
struct ggml_tensor *pie_ffn(pie_graph *g, const pie_layer *L, struct ggml_tensor *x, int il);

#endif /* PIE_INTERNAL_H */
