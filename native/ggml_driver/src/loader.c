/*
 * loader.c — GGUF file -> hyper-parameters + weight tensors on the chosen device.
 *
 * Steps: open the file once (every later read goes through that descriptor) and check it
 * (regular file, magic, not truncated), parse metadata with ggml's gguf API (tensor data not read
 * yet), pick the architecture, read and range-check hyper-parameters, bind and shape-check every
 * tensor the graph uses, decide each layer's device (placement.c) and check each matrix's type
 * against its device, then place the data: on the CPU the file is mapped and the tensors point
 * into the mapping (plain CPU buffer type, no copy); on other devices the tensors are
 * allocated in weight buffers and filled from the file.
 * Weights stay in the type the file stores them in (no dequantize on load).
 */
#include "internal.h"

#include "ggml-alloc.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Metadata helpers (integer keys may be stored with any integer type)                         */
/* ------------------------------------------------------------------------------------------ */

bool pie_gguf_int(const struct gguf_context *g, const char *key, int64_t *out) {
    int64_t id = gguf_find_key(g, key);
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  *out = gguf_get_val_u8(g, id);  return true;
        case GGUF_TYPE_INT8:   *out = gguf_get_val_i8(g, id);  return true;
        case GGUF_TYPE_UINT16: *out = gguf_get_val_u16(g, id); return true;
        case GGUF_TYPE_INT16:  *out = gguf_get_val_i16(g, id); return true;
        case GGUF_TYPE_UINT32: *out = gguf_get_val_u32(g, id); return true;
        case GGUF_TYPE_INT32:  *out = gguf_get_val_i32(g, id); return true;
        case GGUF_TYPE_UINT64: *out = (int64_t)gguf_get_val_u64(g, id); return true;
        case GGUF_TYPE_INT64:  *out = gguf_get_val_i64(g, id); return true;
        default: return false;
    }
}

bool pie_gguf_float(const struct gguf_context *g, const char *key, float *out) {
    int64_t id = gguf_find_key(g, key);
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: *out = gguf_get_val_f32(g, id); return true;
        case GGUF_TYPE_FLOAT64: *out = (float)gguf_get_val_f64(g, id); return true;
        default: {
            int64_t v;
            if (!pie_gguf_int(g, key, &v)) return false;
            *out = (float)v;
            return true;
        }
    }
}

/* "<arch>.<suffix>" */
static const char *akey(const pie_hparams *hp, const char *suffix) {
    static _Thread_local char buf[160];
    snprintf(buf, sizeof(buf), "%s.%s", hp->arch->name, suffix);
    return buf;
}

/* An integer key in 1 .. INT32_MAX: `fallback` when absent (0 = required). */
static int32_t read_count(const struct gguf_context *g, const pie_hparams *hp, const char *suffix, int32_t fallback,
                          int32_t *out) {
    int64_t v;
    const char *key = akey(hp, suffix);
    if (!pie_gguf_int(g, key, &v)) {
        if (fallback <= 0) return pie_set_error(PIE_ERR_FORMAT, "missing metadata key '%s'", key);
        *out = fallback;
        return PIE_OK;
    }
    if (v <= 0 || v > INT32_MAX) return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' has bad value %lld", key, (long long)v);
    *out = (int32_t)v;
    return PIE_OK;
}

int32_t pie_gguf_positive(const struct gguf_context *g, const char *key, bool allow_zero, float *out) {
    float v;
    if (!pie_gguf_float(g, key, &v)) return PIE_OK;
    if (!isfinite(v) || v < 0.0f || (v == 0.0f && !allow_zero))
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is %g; it must be finite and %s 0", key, (double)v,
                             allow_zero ? ">=" : ">");
    *out = v;
    return PIE_OK;
}

/*
 * RoPE scaling, read as llama.cpp reads it: rope.scaling.type "none", "linear" (the default) or
 * "yarn"; rope.scaling.factor (or the older rope.scale_linear; 0 = none); for YaRN the original
 * context length (rope.scaling.original_context_length, default the trained one), an extension
 * factor of 1 and an attention factor that cancels the magnitude scaling ggml's YaRN applies
 * (llama_context's constructor); rope.scaling.attn_factor multiplies it in every case.
 * Sliding-window layers rotate unscaled but share the extension and attention factors.
 */
static int32_t load_rope_scaling(pie_hparams *hp, const struct gguf_context *g) {
    const char *type = "linear";
    const int64_t id = gguf_find_key(g, akey(hp, "rope.scaling.type"));
    if (id >= 0) {
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING)
            return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' must be a string", akey(hp, "rope.scaling.type"));
        type = gguf_get_val_str(g, id);
    }
    float factor = 0.0f, attn_factor = 1.0f;
    int32_t st;
    if ((st = pie_gguf_positive(g, akey(hp, "rope.scale_linear"), true, &factor)) ||
        (st = pie_gguf_positive(g, akey(hp, "rope.scaling.factor"), true, &factor)) ||
        (st = pie_gguf_positive(g, akey(hp, "rope.scaling.attn_factor"), false, &attn_factor)) ||
        (st = read_count(g, hp, "rope.scaling.original_context_length", hp->n_ctx_train, &hp->rope_n_ctx_orig)))
        return st;
    hp->rope_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
    hp->rope_ext_factor = 0.0f;
    hp->rope_attn_factor = attn_factor;
    if (strcmp(type, "none") == 0) {
        hp->rope_scale = 1.0f;
    } else if (strcmp(type, "yarn") == 0) {
        const float f = 1.0f / hp->rope_scale;
        hp->rope_ext_factor = 1.0f;
        hp->rope_attn_factor = attn_factor * (f <= 1.0f ? 1.0f : 0.1f * logf(f) + 1.0f) / (1.0f + 0.1f * logf(f));
    } else if (strcmp(type, "linear") != 0) {
        return pie_set_error(PIE_ERR_UNSUPPORTED, "RoPE scaling type '%s' is not supported (supported: none, linear, yarn)", type);
    }
    return PIE_OK;
}

/* Reads the keys every supported family shares; arch hooks adjust the rest. */
static int32_t load_hparams(pie_hparams *hp, const struct gguf_context *g) {
    int32_t st;
    if ((st = read_count(g, hp, "embedding_length", 0, &hp->n_embd)) ||
        (st = read_count(g, hp, "block_count", 0, &hp->n_layer)) ||
        (st = read_count(g, hp, "feed_forward_length", 0, &hp->n_ff)) ||
        (st = read_count(g, hp, "attention.head_count", 0, &hp->n_head)))
        return st;
    if (hp->n_layer > PIE_MAX_LAYERS)
        return pie_set_error(PIE_ERR_UNSUPPORTED, "%d layers; this driver supports at most %d", hp->n_layer, PIE_MAX_LAYERS);

    if ((st = read_count(g, hp, "context_length", 4096, &hp->n_ctx_train)) ||
        (st = read_count(g, hp, "attention.head_count_kv", hp->n_head, &hp->n_head_kv)) ||
        (st = read_count(g, hp, "attention.key_length", hp->n_embd / hp->n_head, &hp->head_dim)) ||
        (st = read_count(g, hp, "attention.value_length", hp->n_embd / hp->n_head, &hp->head_dim_v)) ||
        (st = read_count(g, hp, "rope.dimension_count", hp->head_dim, &hp->n_rot)))
        return st;
    if (hp->n_head % hp->n_head_kv != 0)
        return pie_set_error(PIE_ERR_FORMAT, "head_count %d is not a multiple of head_count_kv %d", hp->n_head, hp->n_head_kv);
    if (hp->n_rot > hp->head_dim || hp->n_rot % 2)
        return pie_set_error(PIE_ERR_FORMAT, "bad head sizes: key_length %d, value_length %d, rope dims %d",
                             hp->head_dim, hp->head_dim_v, hp->n_rot);

    hp->rope_mode = hp->arch->rope_mode;
    hp->rope_base = 10000.0f;
    hp->rope_base_swa = 10000.0f;
    hp->rms_eps = 1e-6f;
    if ((st = pie_gguf_positive(g, akey(hp, "rope.freq_base"), false, &hp->rope_base)) ||
        (st = pie_gguf_positive(g, akey(hp, "attention.layer_norm_rms_epsilon"), true, &hp->rms_eps)) ||
        (st = load_rope_scaling(hp, g)))
        return st;
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    hp->embd_scale = 1.0f;
    hp->logit_softcap = 0.0f;
    hp->sliding_window = 0;

    int64_t id = gguf_find_key(g, "general.name");
    if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_STRING)
        snprintf(hp->name, sizeof(hp->name), "%s", gguf_get_val_str(g, id));

    return hp->arch->load_hparams ? hp->arch->load_hparams(hp, g) : PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Tensor binding with shape checks                                                           */
/* ------------------------------------------------------------------------------------------ */

static int32_t bind(struct ggml_context *meta, const char *name, int64_t ne0, int64_t ne1, bool required,
                    struct ggml_tensor **out) {
    struct ggml_tensor *t = ggml_get_tensor(meta, name);
    *out = t;
    if (!t) return required ? pie_set_error(PIE_ERR_FORMAT, "tensor '%s' is missing", name) : PIE_OK;
    if (ne1 <= 0 && t->type != GGML_TYPE_F32) /* norms and biases feed element-wise F32 ops */
        return pie_set_error(PIE_ERR_UNSUPPORTED, "tensor '%s' is %s; vectors (norms, biases) must be f32", name, ggml_type_name(t->type));
    int64_t want1 = ne1 > 0 ? ne1 : 1;
    if (t->ne[0] != ne0 || t->ne[1] != want1 || t->ne[2] != 1 || t->ne[3] != 1) {
        if (ne1 > 0)
            return pie_set_error(PIE_ERR_FORMAT,
                                 "tensor '%s' has shape [%lld, %lld, %lld] but the hyper-parameters need [%lld, %lld]",
                                 name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
                                 (long long)ne0, (long long)ne1);
        return pie_set_error(PIE_ERR_FORMAT, "tensor '%s' has shape [%lld, %lld] but the hyper-parameters need [%lld]",
                             name, (long long)t->ne[0], (long long)t->ne[1], (long long)ne0);
    }
    return PIE_OK;
}

static int32_t bind_layer(struct ggml_context *meta, const pie_hparams *hp, int il, pie_layer *L) {
    const int64_t E = hp->n_embd, Q = (int64_t)hp->n_head * hp->head_dim;
    const int64_t K = (int64_t)hp->n_head_kv * hp->head_dim, V = (int64_t)hp->n_head_kv * hp->head_dim_v;
    const int64_t O = (int64_t)hp->n_head * hp->head_dim_v, F = hp->n_ff;
    const uint32_t needs = hp->arch->needs;
    const bool post = needs & PIE_NEED_POST_NORMS, qkn = needs & PIE_NEED_QK_NORM;
    char n[96];
    int32_t st;
#define BIND(field, suffix, ne0, ne1, req)                                        \
    snprintf(n, sizeof(n), "blk.%d." suffix, il);                                 \
    if ((st = bind(meta, n, ne0, ne1, req, &L->field)) != PIE_OK) return st;
    BIND(attn_norm, "attn_norm.weight", E, 0, true)
    BIND(wq, "attn_q.weight", E, Q, true)
    BIND(wk, "attn_k.weight", E, K, true)
    BIND(wv, "attn_v.weight", E, V, true)
    BIND(wo, "attn_output.weight", O, E, true)
    BIND(bq, "attn_q.bias", Q, 0, needs & PIE_NEED_QKV_BIAS)
    BIND(bk, "attn_k.bias", K, 0, needs & PIE_NEED_QKV_BIAS)
    BIND(bv, "attn_v.bias", V, 0, needs & PIE_NEED_QKV_BIAS)
    BIND(bo, "attn_output.bias", E, 0, false)
    BIND(q_norm, "attn_q_norm.weight", hp->head_dim, 0, qkn)
    BIND(k_norm, "attn_k_norm.weight", hp->head_dim, 0, qkn)
    BIND(attn_post_norm, "post_attention_norm.weight", E, 0, post)
    BIND(ffn_norm, "ffn_norm.weight", E, 0, true)
    BIND(ffn_gate, "ffn_gate.weight", E, F, true)
    BIND(ffn_up, "ffn_up.weight", E, F, true)
    BIND(ffn_down, "ffn_down.weight", F, E, true)
    BIND(ffn_post_norm, "post_ffw_norm.weight", E, 0, post)
#undef BIND
    return PIE_OK;
}

static int32_t bind_weights(struct ggml_context *meta, pie_hparams *hp, pie_weights *w) {
    w->tok_embd = ggml_get_tensor(meta, "token_embd.weight");
    if (!w->tok_embd) return pie_set_error(PIE_ERR_FORMAT, "tensor 'token_embd.weight' is missing");
    hp->n_vocab = (int32_t)w->tok_embd->ne[1];
    int32_t st;
    if ((st = bind(meta, "token_embd.weight", hp->n_embd, hp->n_vocab, true, &w->tok_embd)) ||
        (st = bind(meta, "output_norm.weight", hp->n_embd, 0, true, &w->output_norm)) ||
        (st = bind(meta, "output.weight", hp->n_embd, hp->n_vocab, false, &w->output)) ||
        (st = bind(meta, "rope_freqs.weight", hp->n_rot / 2, 0, false, &w->rope_freqs)))
        return st;
    if (!w->output) w->output = w->tok_embd; /* tied embeddings */
    for (int il = 0; il < hp->n_layer; il++)
        if ((st = bind_layer(meta, hp, il, &w->layers[il])) != PIE_OK) return st;
    return PIE_OK;
}

/* The weight types ggml's CPU backend can multiply (those with a vec_dot kernel). The CPU runs
 * any op the device lacks, so every weight must be one of these; other types (integers, f64,
 * q8_1, q8_k) would reach a ggml abort in the middle of a forward pass. */
static bool cpu_multiplies(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q1_0: case GGML_TYPE_Q2_0: case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ1_S: case GGML_TYPE_IQ1_M: case GGML_TYPE_IQ2_XXS: case GGML_TYPE_IQ2_XS:
        case GGML_TYPE_IQ2_S: case GGML_TYPE_IQ3_XXS: case GGML_TYPE_IQ3_S: case GGML_TYPE_IQ4_NL:
        case GGML_TYPE_IQ4_XS: case GGML_TYPE_TQ1_0: case GGML_TYPE_TQ2_0: case GGML_TYPE_MXFP4: case GGML_TYPE_NVFP4:
            return true;
        default:
            return false;
    }
}

/* Checks that the device `w` is placed on can multiply it (off the CPU, the device itself is
 * asked), and notes how pie_matmul treats its products (the zero column's size, the narrow
 * pieces' width). */
static int32_t check_matrix(pie_model *m, const struct ggml_tensor *w) {
    if (!cpu_multiplies(w->type))
        return pie_set_error(PIE_ERR_UNSUPPORTED, "tensor '%s' has type %s, which ggml cannot multiply; "
                             "use a float or quantized (q*, iq*, tq*) weight type", w->name, ggml_type_name(w->type));
    ggml_backend_dev_t dev = m->place.dev[pie_tensor_device(m, w)];
    if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        struct ggml_init_params ip = { .mem_size = 4 * ggml_tensor_overhead(), .mem_buffer = NULL, .no_alloc = true };
        struct ggml_context *ctx = ggml_init(ip);
        if (!ctx) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot check tensor '%s'", w->name);
        struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 1);
        const bool ok = ggml_backend_dev_supports_op(dev, ggml_mul_mat(ctx, (struct ggml_tensor *)w, x));
        ggml_free(ctx);
        if (!ok)
            return pie_set_error(PIE_ERR_UNSUPPORTED, "tensor '%s' has type %s, which %s cannot multiply", w->name,
                                 ggml_type_name(w->type), ggml_backend_dev_name(dev));
    }
    const int32_t k = pie_kernel_switch(w->type);
    if (k == 2 && w->ne[0] > m->pad_width) m->pad_width = w->ne[0];
    if (k > 2 && (m->split_cols == 0 || k - 1 < m->split_cols)) m->split_cols = k - 1;
    return PIE_OK;
}

/* Every matrix the graph multiplies (or, for the embeddings, reads rows of). */
static int32_t check_matrices(pie_model *m) {
    const pie_weights *w = &m->w;
    m->pad_width = 0;
    m->split_cols = 0;
    int32_t st;
    if ((st = check_matrix(m, w->tok_embd)) || (st = check_matrix(m, w->output))) return st;
    for (int il = 0; il < m->hp.n_layer; il++) {
        const pie_layer *L = &w->layers[il];
        const struct ggml_tensor *mats[] = { L->wq, L->wk, L->wv, L->wo, L->ffn_gate, L->ffn_up, L->ffn_down };
        for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++)
            if ((st = check_matrix(m, mats[i])) != PIE_OK) return st;
    }
    return PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Placing the data                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* The CPU's weights point into a mapping of the file (no copy): one buffer wraps the file's
 * data and each CPU tensor gets its address there. */
static int32_t place_mapped(pie_model *m, const struct gguf_context *g, FILE *f, const char *path, size_t file_size,
                            struct ggml_tensor **ts, const int *dev, int n) {
    void *addr = mmap(NULL, file_size, PROT_READ, MAP_PRIVATE, fileno(f), 0);
    if (addr == MAP_FAILED) return pie_set_error(PIE_ERR_IO, "cannot map '%s': %s", path, strerror(errno));
    m->map_addr = addr;
    m->map_size = file_size;

    pie_placement *pl = &m->place;
    size_t off = gguf_get_data_offset(g);
    uint8_t *base = (uint8_t *)addr + off;
    ggml_backend_buffer_t buf = ggml_backend_cpu_buffer_from_ptr(base, file_size - off);
    if (!buf || pl->n_buf >= PIE_MAX_BUFFERS) {
        if (buf) ggml_backend_buffer_free(buf);
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot wrap the mapped weights in a CPU buffer");
    }
    pl->buf[pl->n_buf++] = buf;
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (int i = 0; i < n; i++) {
        if (dev[i] != pl->n_dev - 1) continue;
        int64_t id = gguf_find_tensor(g, ggml_get_name(ts[i]));
        if (ggml_backend_tensor_alloc(buf, ts[i], base + gguf_get_tensor_offset(g, id)) != GGML_STATUS_SUCCESS)
            return pie_set_error(PIE_ERR_FORMAT, "tensor '%s' does not fit in the file", ggml_get_name(ts[i]));
    }
    return PIE_OK;
}

/* Fills allocated tensors from the file (the tied head's copy reads the embeddings). */
static int32_t read_tensors(pie_model *m, const struct gguf_context *g, FILE *f, const char *path,
                            struct ggml_tensor **ts, const int *dev, int n) {
    size_t cap = 0;
    void *tmp = NULL;
    int32_t st = PIE_OK;
    const size_t off = gguf_get_data_offset(g);
    for (int i = 0; i < n && st == PIE_OK; i++) {
        if (dev[i] < 0) continue;
        const struct ggml_tensor *src = ts[i] == m->w.output && m->place.dup_src ? m->place.dup_src : ts[i];
        size_t nb = ggml_nbytes(ts[i]);
        if (nb > cap) {
            free(tmp);
            tmp = malloc(nb);
            cap = tmp ? nb : 0;
            if (!tmp) { st = pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes to read '%s'", nb, ggml_get_name(ts[i])); break; }
        }
        int64_t id = gguf_find_tensor(g, ggml_get_name(src));
        if (fseeko(f, (off_t)(off + gguf_get_tensor_offset(g, id)), SEEK_SET) != 0 || fread(tmp, 1, nb, f) != nb)
            st = pie_set_error(PIE_ERR_IO, "short read of tensor '%s' from '%s'", ggml_get_name(src), path);
        else
            ggml_backend_tensor_set(ts[i], tmp, 0, nb);
    }
    free(tmp);
    return st;
}

/* A head tied to the embeddings but placed off the CPU gets its own copy there (the embeddings
 * stay on the CPU for the row lookup), as llama.cpp duplicates it. */
static int32_t split_tied_head(pie_model *m) {
    pie_placement *pl = &m->place;
    if (m->w.output != m->w.tok_embd || pl->output_dev == pl->n_dev - 1) return PIE_OK;
    struct ggml_init_params ip = { .mem_size = 2 * ggml_tensor_overhead(), .mem_buffer = NULL, .no_alloc = true };
    pl->ctx_dup = ggml_init(ip);
    if (!pl->ctx_dup) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot create the head's context");
    pl->dup_src = m->w.tok_embd;
    m->w.output = ggml_dup_tensor(pl->ctx_dup, m->w.tok_embd); /* [n_embd, n_vocab] */
    ggml_set_name(m->w.output, "output.weight");
    return PIE_OK;
}

/* Every weight on its device: mapped in place on the CPU where possible, else allocated in
 * buffers marked as weights and read from the file. */
static int32_t place_weights(pie_model *m, const struct gguf_context *g, FILE *f, const char *path, size_t file_size) {
    int n = 0;
    for (struct ggml_tensor *t = ggml_get_first_tensor(m->ctx_w); t; t = ggml_get_next_tensor(m->ctx_w, t)) n++;
    n += m->place.ctx_dup ? 1 : 0;
    struct ggml_tensor **ts = malloc(sizeof(*ts) * (size_t)n);
    int *dev = malloc(sizeof(int) * (size_t)n);
    if (!ts || !dev) { free(ts); free(dev); return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot list the tensors"); }
    int k = 0;
    for (struct ggml_tensor *t = ggml_get_first_tensor(m->ctx_w); t; t = ggml_get_next_tensor(m->ctx_w, t)) ts[k++] = t;
    if (m->place.ctx_dup) ts[k++] = m->w.output;
    for (int i = 0; i < n; i++) dev[i] = pie_tensor_device(m, ts[i]);

    /* Mapping needs a host device and the data aligned the way ggml's CPU buffer expects. */
    const int cpu = m->place.n_dev - 1;
    const bool host = ggml_backend_buft_is_host(ggml_backend_dev_buffer_type(m->place.dev[cpu]));
    int32_t st = PIE_OK;
    if (m->params.use_mmap && host && gguf_get_data_offset(g) % 32 == 0) {
        st = place_mapped(m, g, f, path, file_size, ts, dev, n);
        for (int i = 0; i < n; i++)
            if (dev[i] == cpu) dev[i] = -1; /* in place: nothing to allocate or read */
    }
    if (st == PIE_OK) st = pie_alloc_on_devices(m, ts, dev, n, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    if (st == PIE_OK) st = read_tensors(m, g, f, path, ts, dev, n);
    free(ts);
    free(dev);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry point                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Opens the file once: everything after reads this descriptor (metadata, mapping, tensor
 * data), so a file replaced at the path while it loads cannot mix two files. */
static int32_t open_model(const char *path, FILE **out_f, size_t *out_size) {
    /* O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it */
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return pie_set_error(PIE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        const int32_t st = fstat(fd, &sb) != 0 ? pie_set_error(PIE_ERR_IO, "cannot stat '%s': %s", path, strerror(errno))
                                               : pie_set_error(PIE_ERR_IO, "'%s' is not a regular file", path);
        close(fd);
        return st;
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        const int32_t st = pie_set_error(PIE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
        close(fd);
        return st;
    }
    char magic[4] = {0};
    int32_t st = PIE_OK;
    if (fread(magic, 1, 4, f) < 4 || memcmp(magic, "GGUF", 4) != 0)
        st = pie_set_error(PIE_ERR_FORMAT, "'%s' is not a GGUF file (bad magic)", path);
    else if (fseeko(f, 0, SEEK_SET) != 0) st = pie_set_error(PIE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    if (st != PIE_OK) {
        fclose(f);
        return st;
    }
    *out_f = f;
    *out_size = (size_t)sb.st_size;
    return PIE_OK;
}

int32_t pie_load_weights(pie_model *m, const char *path, bool plan_only) {
    FILE *f = NULL;
    size_t file_size = 0;
    int32_t st = open_model(path, &f, &file_size);
    if (st != PIE_OK) return st;

    struct ggml_context *meta = NULL;
    struct gguf_init_params gp = { .no_alloc = true, .ctx = &meta };
    struct gguf_context *g = gguf_init_from_file_ptr(f, gp);
    if (!g) {
        fclose(f);
        return pie_set_error(PIE_ERR_FORMAT, "'%s' is a corrupt or truncated GGUF file (metadata unreadable)", path);
    }
    m->ctx_w = meta;
    pie_log(PIE_LOG_DEBUG, "read the metadata of '%s': %lld keys, %lld tensors", path, (long long)gguf_get_n_kv(g),
            (long long)gguf_get_n_tensors(g));

    /* every tensor's data must lie inside the file */
    const size_t off = gguf_get_data_offset(g);
    for (int64_t i = 0; i < gguf_get_n_tensors(g); i++) {
        size_t end = off + gguf_get_tensor_offset(g, i) + gguf_get_tensor_size(g, i);
        if (end > file_size) {
            st = pie_set_error(PIE_ERR_FORMAT, "'%s' is truncated: tensor '%s' ends at byte %zu but the file has %zu",
                               path, gguf_get_tensor_name(g, i), end, file_size);
            goto done;
        }
    }

    int64_t id = gguf_find_key(g, "general.architecture");
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
        st = pie_set_error(PIE_ERR_FORMAT, "'%s' has no general.architecture key", path);
        goto done;
    }
    const char *arch = gguf_get_val_str(g, id);
    m->hp.arch = pie_arch_find(arch);
    if (!m->hp.arch) {
        char supported[256];
        pie_arch_list(supported, sizeof(supported));
        st = pie_set_error(PIE_ERR_UNSUPPORTED, "unsupported architecture '%s' (supported: %s)", arch, supported);
        goto done;
    }
    if ((st = load_hparams(&m->hp, g)) != PIE_OK) goto done;
    if ((st = bind_weights(meta, &m->hp, &m->w)) != PIE_OK || (st = pie_place_layers(m)) != PIE_OK ||
        (st = split_tied_head(m)) != PIE_OK || (st = check_matrices(m)) != PIE_OK)
        goto done;

    m->n_params = 0;
    m->weight_bytes = 0;
    for (struct ggml_tensor *t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
        m->n_params += ggml_nelements(t);
        m->weight_bytes += (int64_t)ggml_nbytes(t);
    }

    if (plan_only) goto done;
    st = place_weights(m, g, f, path, file_size);
    if (st == PIE_OK)
        pie_log(PIE_LOG_INFO, "loaded %s '%s': %d layers, %d vocab, %.1f MiB of weights (%s)", arch, m->hp.name,
                m->hp.n_layer, m->hp.n_vocab, m->weight_bytes / 1048576.0, m->map_addr ? "mapped" : "copied");
done:
    gguf_free(g);
    fclose(f);
    return st;
}

/* The weights' buffers belong to the placement (pie_devices_close frees them first). */
void pie_free_weights(pie_model *m) {
    if (m->ctx_w) ggml_free(m->ctx_w);
    if (m->map_addr) munmap(m->map_addr, m->map_size);
    m->ctx_w = NULL;
    m->map_addr = NULL;
}
