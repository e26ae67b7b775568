/*
 * loader.c — GGUF file -> hyper-parameters + weight tensors on the chosen device.
 *
 * Steps: open the file once (every later read goes through that descriptor) and check it
 * (regular file, magic, not truncated), parse metadata with ggml's gguf API (tensor data not read
 * yet), pick the architecture, read and range-check hyper-parameters, bind and shape-check every
 * tensor the graph uses, decide each layer's device (placement.c) and check each matrix's type
 * against its device, then place the data: on the CPU the matrices ggml's CPU_REPACK kernels
 * take are first copied into a buffer of that type (repacked, see place_repacked), the other
 * tensors point into a mapping of the file (plain CPU buffer type, no copy); on other devices
 * the tensors are allocated in weight buffers and filled from the file.
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

int32_t pie_gguf_int_opt(const struct gguf_context *g, const char *key, int64_t *out) {
    if (gguf_find_key(g, key) >= 0 && !pie_gguf_int(g, key, out))
        return pie_set_error(PIE_ERR_UNSUPPORTED, "metadata key '%s' must be one integer (per-layer arrays are not "
                             "supported)", key);
    return PIE_OK;
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

/* feed_forward_length: one count, or one per layer (Gemma 3n's converter writes a list) when
 * every layer has the same; a file whose layers differ is refused. */
static int32_t read_ff(const struct gguf_context *g, const pie_hparams *hp, int32_t *out) {
    const char *key = akey(hp, "feed_forward_length");
    const int64_t id = gguf_find_key(g, key);
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY) return read_count(g, hp, "feed_forward_length", 0, out);
    const enum gguf_type t = gguf_get_arr_type(g, id);
    if ((t != GGUF_TYPE_INT32 && t != GGUF_TYPE_UINT32) || (int64_t)gguf_get_arr_n(g, id) != hp->n_layer)
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' must be one count or %d 32-bit counts", key, hp->n_layer);
    const int32_t *v = gguf_get_arr_data(g, id); /* both types: the values are small and positive */
    for (int il = 0; il < hp->n_layer; il++) {
        if (v[il] <= 0) return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' has bad value %d for layer %d", key, v[il], il);
        if (v[il] != v[0])
            return pie_set_error(PIE_ERR_UNSUPPORTED, "metadata key '%s': layers of different widths (%d, %d) are not "
                                 "supported", key, v[0], v[il]);
    }
    *out = v[0];
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

/* llama.cpp's YaRN magnitude factor for a context extended `scale` times */
static float yarn_mscale(float scale, float mscale) { return scale <= 1.0f ? 1.0f : 0.1f * mscale * logf(scale) + 1.0f; }

/*
 * RoPE scaling, read as llama.cpp reads it: rope.scaling.type "none", "linear" (the default),
 * "yarn" or "longrope" (linear, plus frequency factors chosen by context: bind_rope_factors);
 * rope.scaling.factor (or the older rope.scale_linear; 0 = none); for YaRN the original context
 * length (rope.scaling.original_context_length, default the trained one), an extension factor of
 * 1 and an attention factor that cancels the magnitude scaling ggml's YaRN applies
 * (llama_context's constructor, in its order of float operations), with Mistral 3's
 * yarn_log_multiplier and correction range (yarn_beta_fast/slow) where the family reads them;
 * rope.scaling.attn_factor multiplies it in every case. Sliding-window layers rotate unscaled
 * but share the extension and attention factors unless their family's hook says otherwise.
 */
static int32_t load_rope_scaling(pie_hparams *hp, const struct gguf_context *g) {
    const char *type = "linear";
    const int64_t id = gguf_find_key(g, akey(hp, "rope.scaling.type"));
    if (id >= 0) {
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING)
            return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' must be a string", akey(hp, "rope.scaling.type"));
        type = gguf_get_val_str(g, id);
    }
    float factor = 0.0f, attn_factor = 1.0f, log_mul = 0.0f;
    hp->rope_beta_fast = 32.0f; /* llama.cpp's defaults */
    hp->rope_beta_slow = 1.0f;
    int32_t st;
    if ((st = pie_gguf_positive(g, akey(hp, "rope.scale_linear"), true, &factor)) ||
        (st = pie_gguf_positive(g, akey(hp, "rope.scaling.factor"), true, &factor)) ||
        (st = pie_gguf_positive(g, akey(hp, "rope.scaling.attn_factor"), false, &attn_factor)) ||
        (st = read_count(g, hp, "rope.scaling.original_context_length", hp->n_ctx_train, &hp->rope_n_ctx_orig)))
        return st;
    if ((hp->arch->needs & PIE_YARN_KEYS) &&
        ((st = pie_gguf_positive(g, akey(hp, "rope.scaling.yarn_log_multiplier"), true, &log_mul)) ||
         (st = pie_gguf_positive(g, akey(hp, "rope.scaling.yarn_beta_fast"), false, &hp->rope_beta_fast)) ||
         (st = pie_gguf_positive(g, akey(hp, "rope.scaling.yarn_beta_slow"), false, &hp->rope_beta_slow))))
        return st;
    hp->rope_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
    hp->rope_ext_factor = 0.0f;
    hp->rope_attn_factor = attn_factor;
    hp->longrope = false;
    if (strcmp(type, "none") == 0) {
        hp->rope_scale = 1.0f;
    } else if (strcmp(type, "yarn") == 0) {
        const float f = 1.0f / hp->rope_scale;
        float a = log_mul != 0.0f ? yarn_mscale(f, 1.0f) / yarn_mscale(f, log_mul) : yarn_mscale(f, 1.0f);
        a *= 1.0f / (1.0f + 0.1f * logf(f));
        hp->rope_ext_factor = 1.0f;
        hp->rope_attn_factor = a * attn_factor;
    } else if (strcmp(type, "longrope") == 0) {
        hp->longrope = true;
    } else if (strcmp(type, "linear") != 0) {
        return pie_set_error(PIE_ERR_UNSUPPORTED,
                             "RoPE scaling type '%s' is not supported (supported: none, linear, yarn, longrope)", type);
    }
    hp->rope_ext_factor_swa = hp->rope_ext_factor;
    hp->rope_attn_factor_swa = hp->rope_attn_factor;
    return PIE_OK;
}

int32_t pie_load_swa(pie_hparams *hp, const struct gguf_context *g, int64_t default_window, int64_t default_pattern) {
    int64_t window = default_window;
    pie_gguf_int(g, akey(hp, "attention.sliding_window"), &window);
    if (window <= 0) return PIE_OK;
    if (window > INT32_MAX)
        return pie_set_error(PIE_ERR_FORMAT, "%s %lld is too large", akey(hp, "attention.sliding_window"), (long long)window);
    hp->sliding_window = (int32_t)window;

    /* pattern: an array of per-layer flags, or n (every n-th layer global) */
    const char *key = akey(hp, "attention.sliding_window_pattern");
    int64_t id = gguf_find_key(g, key);
    if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY) {
        if (gguf_get_arr_type(g, id) != GGUF_TYPE_BOOL || (int64_t)gguf_get_arr_n(g, id) != hp->n_layer)
            return pie_set_error(PIE_ERR_FORMAT, "%s must hold %d booleans", key, hp->n_layer);
        const bool *flags = gguf_get_arr_data(g, id);
        for (int il = 0; il < hp->n_layer; il++) hp->is_swa[il] = flags[il];
        return PIE_OK;
    }
    int64_t n = default_pattern;
    pie_gguf_int(g, key, &n);
    if (n < 0) return pie_set_error(PIE_ERR_FORMAT, "%s is negative (%lld)", key, (long long)n);
    for (int il = 0; il < hp->n_layer; il++) hp->is_swa[il] = n == 0 || (il % n < n - 1);
    return PIE_OK;
}

/*
 * Mixture of experts, for the families that have them: expert_count (absent or 0: a dense FFN,
 * which families that only come with experts reject) and expert_used_count, 1 .. expert_count
 * when there are experts. An expert's width defaults to feed_forward_length (the qwen MoE and
 * gpt-oss hooks read their own keys). Other families ignore these keys, as llama.cpp does.
 */
static int32_t load_experts(pie_hparams *hp, const struct gguf_context *g) {
    int64_t n_exp = 0, n_used = 0;
    hp->n_expert = hp->n_expert_used = hp->n_ff_shexp = 0;
    hp->n_ff_exp = hp->n_ff;
    if (!(hp->arch->needs & (PIE_NEED_EXPERTS | PIE_ALLOW_EXPERTS))) return PIE_OK; /* dense: keys ignored */
    char used_key[160];
    snprintf(used_key, sizeof(used_key), "%s", akey(hp, "expert_used_count"));
    const bool has_used = gguf_find_key(g, used_key) >= 0;
    int32_t st;
    if ((st = pie_gguf_int_opt(g, used_key, &n_used)) || (st = pie_gguf_int_opt(g, akey(hp, "expert_count"), &n_exp)))
        return st;
    if (n_exp < 0 || n_exp > PIE_MAX_EXPERTS)
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is %lld; it must be 0 .. %d", akey(hp, "expert_count"),
                             (long long)n_exp, PIE_MAX_EXPERTS);
    if (n_exp == 0 && (hp->arch->needs & PIE_NEED_EXPERTS))
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is missing or 0, but %s is a mixture-of-experts "
                             "architecture", akey(hp, "expert_count"), hp->arch->name);
    if (n_exp == 0 && has_used && n_used != 0)
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is %lld but the model has no experts (%s is 0 or "
                             "missing)", used_key, (long long)n_used, akey(hp, "expert_count"));
    if (n_exp > 0 && (n_used < 1 || n_used > n_exp))
        return pie_set_error(PIE_ERR_FORMAT, "metadata key '%s' is %lld%s; it must be 1 .. %s (%lld)", used_key,
                             (long long)n_used, has_used ? "" : " (missing)", akey(hp, "expert_count"), (long long)n_exp);
    hp->n_expert = (int32_t)n_exp;
    hp->n_expert_used = (int32_t)n_used;
    return PIE_OK;
}

/* Reads the keys every supported family shares; arch hooks adjust the rest. */
static int32_t load_hparams(pie_hparams *hp, const struct gguf_context *g) {
    int32_t st;
    if ((st = read_count(g, hp, "embedding_length", 0, &hp->n_embd)) ||
        (st = read_count(g, hp, "block_count", 0, &hp->n_layer)) ||
        (st = read_ff(g, hp, &hp->n_ff)) ||
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
    hp->rope_scale_swa = 1.0f;
    hp->rms_eps = 1e-6f;
    if ((st = pie_gguf_positive(g, akey(hp, "rope.freq_base"), false, &hp->rope_base)) ||
        (st = pie_gguf_positive(g, akey(hp, "attention.layer_norm_rms_epsilon"), true, &hp->rms_eps)) ||
        (st = load_rope_scaling(hp, g)))
        return st;
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    hp->embd_scale = 1.0f;
    hp->embd_scale_input = false;
    hp->residual_scale = 1.0f;
    hp->logit_scale = 1.0f;
    hp->logit_softcap = 0.0f;
    hp->attn_softcap = 0.0f;
    hp->attn_temp_scale = 0.0f;
    hp->attn_temp_floor = hp->rope_n_ctx_orig;
    hp->sliding_window = 0;
    memset(hp->is_swa, 0, sizeof(hp->is_swa));
    memset(hp->no_rope, 0, sizeof(hp->no_rope));
    hp->n_layer_kv = hp->n_layer; /* every layer owns its KV unless the family shares it */
    for (int il = 0; il < hp->n_layer; il++) hp->kv_layer[il] = il;

    int64_t id = gguf_find_key(g, "general.name");
    if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_STRING)
        snprintf(hp->name, sizeof(hp->name), "%s", gguf_get_val_str(g, id));

    if ((st = load_experts(hp, g)) != PIE_OK) return st;
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

int32_t pie_bind_tensor(struct ggml_context *meta, const char *name, int64_t ne0, int64_t ne1, bool required,
                        struct ggml_tensor **out) {
    return bind(meta, name, ne0, ne1, required, out);
}

/* A 3-D tensor of per-expert matrices [ne0, ne1, ne2]. */
static int32_t bind3(struct ggml_context *meta, const char *name, int64_t ne0, int64_t ne1, int64_t ne2,
                     struct ggml_tensor **out) {
    struct ggml_tensor *t = ggml_get_tensor(meta, name);
    *out = t;
    if (!t) return pie_set_error(PIE_ERR_FORMAT, "tensor '%s' is missing", name);
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != ne2 || t->ne[3] != 1)
        return pie_set_error(PIE_ERR_FORMAT,
                             "tensor '%s' has shape [%lld, %lld, %lld, %lld] but the hyper-parameters need [%lld, %lld, %lld]",
                             name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3],
                             (long long)ne0, (long long)ne1, (long long)ne2);
    return PIE_OK;
}

/* A layer's experts: router, per-expert gate/up/down, gpt-oss's biases, and the shared expert
 * where the family has one. */
static int32_t bind_experts(struct ggml_context *meta, const pie_hparams *hp, int il, pie_layer *L) {
    const int64_t E = hp->n_embd, X = hp->n_expert, F = hp->n_ff_exp, S = hp->n_ff_shexp;
    char n[96];
    int32_t st;
#define NAME(suffix) snprintf(n, sizeof(n), "blk.%d." suffix, il)
    NAME("ffn_gate_inp.weight");
    if ((st = bind(meta, n, E, X, true, &L->ffn_gate_inp)) != PIE_OK) return st;
    NAME("ffn_gate_exps.weight");
    if ((st = bind3(meta, n, E, F, X, &L->ffn_gate_exps)) != PIE_OK) return st;
    NAME("ffn_up_exps.weight");
    if ((st = bind3(meta, n, E, F, X, &L->ffn_up_exps)) != PIE_OK) return st;
    NAME("ffn_down_exps.weight");
    if ((st = bind3(meta, n, F, E, X, &L->ffn_down_exps)) != PIE_OK) return st;
    if (hp->arch->needs & PIE_NEED_OAI_MOE) { /* biases: the router's, then per expert (rows) */
        NAME("ffn_gate_inp.bias");
        if ((st = bind(meta, n, X, 0, true, &L->ffn_gate_inp_b)) != PIE_OK) return st;
        struct { struct ggml_tensor **t; const char *suffix; int64_t ne0; } b[] = {
            { &L->ffn_gate_exps_b, "ffn_gate_exps.bias", F },
            { &L->ffn_up_exps_b,   "ffn_up_exps.bias",   F },
            { &L->ffn_down_exps_b, "ffn_down_exps.bias", E },
        };
        for (size_t i = 0; i < sizeof(b) / sizeof(b[0]); i++) {
            snprintf(n, sizeof(n), "blk.%d.%s", il, b[i].suffix);
            if ((st = bind(meta, n, b[i].ne0, X, true, b[i].t)) != PIE_OK) return st;
            if ((*b[i].t)->type != GGML_TYPE_F32) /* added to f32 rows (add_id) */
                return pie_set_error(PIE_ERR_UNSUPPORTED, "tensor '%s' is %s; expert biases must be f32", n,
                                     ggml_type_name((*b[i].t)->type));
        }
    }
    if (!(hp->arch->needs & PIE_NEED_SHARED_EXPERT)) return PIE_OK;
    NAME("ffn_gate_inp_shexp.weight");
    if ((st = bind(meta, n, E, 0, true, &L->ffn_gate_inp_shexp)) != PIE_OK) return st;
    NAME("ffn_gate_shexp.weight");
    if ((st = bind(meta, n, E, S, true, &L->ffn_gate_shexp)) != PIE_OK) return st;
    NAME("ffn_up_shexp.weight");
    if ((st = bind(meta, n, E, S, true, &L->ffn_up_shexp)) != PIE_OK) return st;
    NAME("ffn_down_shexp.weight");
    if ((st = bind(meta, n, S, E, true, &L->ffn_down_shexp)) != PIE_OK) return st;
#undef NAME
    return PIE_OK;
}

/*
 * gemma3n's tensors beyond a Gemma layer's (llama.cpp's names and shapes): per-layer token
 * embeddings and the projection of the input onto them, AltUp's projections into and out of
 * its extra streams, and per layer the per-layer input gate and projection, AltUp's router and
 * coefficients, LAuReL's low-rank pair. LAuReL's rank is read off blk.0.laurel_l (no key holds
 * it). Layers that share an earlier layer's KV need no K or V projection: the file's are checked
 * like llama.cpp checks them, then left out of the graph (never multiplied, never repacked).
 */
static int32_t bind_gemma3n(struct ggml_context *meta, pie_hparams *hp, pie_weights *w) {
    const int64_t E = hp->n_embd, A = hp->n_altup, P = (int64_t)hp->n_embd_altup * hp->n_layer;
    int32_t st;
    if ((st = bind(meta, "per_layer_token_embd.weight", P, hp->n_vocab, true, &w->per_layer_tok_embd)) ||
        (st = bind(meta, "per_layer_model_proj.weight", E, P, true, &w->per_layer_model_proj)) ||
        (st = bind(meta, "per_layer_proj_norm.weight", hp->n_embd_altup, 0, true, &w->per_layer_proj_norm)) ||
        (st = bind3(meta, "altup_proj.weight", E, E, A - 1, &w->altup_proj)) ||
        (st = bind3(meta, "altup_unembd_proj.weight", E, E, A - 1, &w->altup_unembd_proj)))
        return st;
    const struct ggml_tensor *l0 = ggml_get_tensor(meta, "blk.0.laurel_l.weight");
    if (!l0) return pie_set_error(PIE_ERR_FORMAT, "tensor 'blk.0.laurel_l.weight' is missing");
    if (l0->ne[1] < 1 || l0->ne[1] > INT32_MAX)
        return pie_set_error(PIE_ERR_FORMAT, "tensor 'blk.0.laurel_l.weight' has a bad rank %lld", (long long)l0->ne[1]);
    hp->laurel_rank = (int32_t)l0->ne[1];
    return PIE_OK;
}

static int32_t bind_gemma3n_layer(struct ggml_context *meta, const pie_hparams *hp, int il, pie_layer *L) {
    const int64_t E = hp->n_embd, A = hp->n_altup, P = hp->n_embd_altup, R = hp->laurel_rank;
    char n[96];
    int32_t st;
#define BIND(field, suffix, ne0, ne1)                                             \
    snprintf(n, sizeof(n), "blk.%d." suffix, il);                                 \
    if ((st = bind(meta, n, ne0, ne1, true, &L->field)) != PIE_OK) return st;
    BIND(inp_gate, "inp_gate.weight", E, P)
    BIND(proj, "proj.weight", P, E)
    BIND(post_norm, "post_norm.weight", E, 0)
    BIND(altup_correct_coef, "altup_correct_coef.weight", A, A)
    BIND(altup_correct_scale, "altup_correct_scale.weight", E, 0)
    BIND(altup_predict_coef, "altup_predict_coef.weight", A, A * A)
    BIND(altup_router, "altup_router.weight", E, A)
    BIND(altup_router_norm, "altup_router_norm.weight", E, 0)
    BIND(laurel_l, "laurel_l.weight", E, R)
    BIND(laurel_r, "laurel_r.weight", R, E)
    BIND(laurel_post_norm, "laurel_post_norm.weight", E, 0)
#undef BIND
    if (il >= hp->n_layer_kv) L->wk = L->wv = L->bk = L->bv = NULL; /* reads an earlier layer's KV */
    return PIE_OK;
}

/* Layer il's attention projections: Q, K, V as one fused matrix (as llama.cpp, for every family)
 * or three, their biases (required with qkv_bias), the output projection and its bias. */
int32_t pie_bind_attention(struct ggml_context *meta, int il, int64_t E, int64_t Q, int64_t K, int64_t V, int64_t O,
                           bool qkv_bias, pie_layer *L) {
    char n[96];
    int32_t st;
#define BIND(field, suffix, ne0, ne1, req)                                        \
    snprintf(n, sizeof(n), "blk.%d." suffix, il);                                 \
    if ((st = bind(meta, n, ne0, ne1, req, &L->field)) != PIE_OK) return st;
    BIND(wqkv, "attn_qkv.weight", E, Q + K + V, false)
    if (L->wqkv) {
        BIND(bqkv, "attn_qkv.bias", Q + K + V, 0, false)
    } else {
        BIND(wq, "attn_q.weight", E, Q, true)
        BIND(wk, "attn_k.weight", E, K, true)
        BIND(wv, "attn_v.weight", E, V, true)
    }
    if (!L->bqkv) {
        BIND(bq, "attn_q.bias", Q, 0, qkv_bias)
        BIND(bk, "attn_k.bias", K, 0, qkv_bias)
        BIND(bv, "attn_v.bias", V, 0, qkv_bias)
        /* a fused projection takes separate biases only all three together (llama.cpp's build_qkv) */
        if (L->wqkv && !(L->bq && L->bk && L->bv)) L->bq = L->bk = L->bv = NULL;
    }
    BIND(wo, "attn_output.weight", O, E, true)
    BIND(bo, "attn_output.bias", E, 0, false)
#undef BIND
    return PIE_OK;
}

static int32_t bind_layer(struct ggml_context *meta, const pie_hparams *hp, int il, pie_layer *L) {
    const int64_t E = hp->n_embd, Q = (int64_t)hp->n_head * hp->head_dim;
    const int64_t K = (int64_t)hp->n_head_kv * hp->head_dim, V = (int64_t)hp->n_head_kv * hp->head_dim_v;
    const int64_t O = (int64_t)hp->n_head * hp->head_dim_v, F = hp->n_ff;
    const uint32_t needs = hp->arch->needs;
    const bool post = needs & PIE_NEED_POST_NORMS, qkn = needs & PIE_NEED_QK_NORM, pre = !(needs & PIE_NO_PRE_NORMS);
    const bool full = needs & PIE_QK_NORM_FULL, ffn_bias = needs & PIE_FFN_BIAS;
    const bool dense = hp->n_expert == 0, oai = needs & PIE_NEED_OAI_MOE;
    char n[96];
    int32_t st;
#define BIND(field, suffix, ne0, ne1, req)                                        \
    snprintf(n, sizeof(n), "blk.%d." suffix, il);                                 \
    if ((st = bind(meta, n, ne0, ne1, req, &L->field)) != PIE_OK) return st;
    if (pre) { BIND(attn_norm, "attn_norm.weight", E, 0, true) }
    if ((st = pie_bind_attention(meta, il, E, Q, K, V, O, (needs & PIE_NEED_QKV_BIAS) != 0, L)) != PIE_OK) return st;
    BIND(q_norm, "attn_q_norm.weight", full ? Q : hp->head_dim, 0, qkn)
    BIND(k_norm, "attn_k_norm.weight", full ? K : hp->head_dim, 0, qkn)
    BIND(attn_post_norm, "post_attention_norm.weight", E, 0, post || oai)
    if (oai) { BIND(attn_sinks, "attn_sinks.weight", hp->n_head, 0, true) }
    if (pre && !oai) { BIND(ffn_norm, "ffn_norm.weight", E, 0, true) } /* gpt-oss: attn_post_norm */
    if (!dense) {
        BIND(ffn_post_norm, "post_ffw_norm.weight", E, 0, post)
        return bind_experts(meta, hp, il, L);
    }
    if (needs & PIE_FUSED_GATE_UP) {
        BIND(ffn_up, "ffn_up.weight", E, 2 * F, true) /* gate half, then up half */
    } else {
        BIND(ffn_gate, "ffn_gate.weight", E, F, true)
        BIND(ffn_up, "ffn_up.weight", E, F, true)
        if (ffn_bias) {
            BIND(ffn_gate_b, "ffn_gate.bias", F, 0, false)
            BIND(ffn_up_b, "ffn_up.bias", F, 0, false)
        }
    }
    BIND(ffn_down, "ffn_down.weight", F, E, true)
    if (ffn_bias) { BIND(ffn_down_b, "ffn_down.bias", E, 0, false) }
    BIND(ffn_post_norm, "post_ffw_norm.weight", E, 0, post)
#undef BIND
    return needs & PIE_NEED_ALTUP ? bind_gemma3n_layer(meta, hp, il, L) : PIE_OK;
}

/*
 * Rope frequency factors. LongRoPE files (Phi-3, or rope.scaling.type "longrope") hold a long
 * and a short set; like llama.cpp, a context longer than the original one (n_ctx_seq > n_ctx_orig)
 * takes the long set. llama.cpp's context is what one sequence may hold; here one sequence may
 * hold the whole pool, so that is the context. Other files may hold one set (rope_freqs,
 * Llama 3.1). Families whose graph rotates without factors bind none.
 */
static int32_t bind_rope_factors(struct ggml_context *meta, const pie_hparams *hp, pie_weights *w, int64_t n_ctx_seq) {
    const uint32_t needs = hp->arch->needs;
    w->rope_freqs = NULL;
    if (needs & PIE_NO_ROPE_FACTORS) return PIE_OK;
    if (!(needs & PIE_LONGROPE) && !hp->longrope) return bind(meta, "rope_freqs.weight", hp->n_rot / 2, 0, false, &w->rope_freqs);
    struct ggml_tensor *lng = NULL, *shrt = NULL;
    int32_t st;
    if ((st = bind(meta, "rope_factors_long.weight", hp->n_rot / 2, 0, false, &lng)) ||
        (st = bind(meta, "rope_factors_short.weight", hp->n_rot / 2, 0, false, &shrt)))
        return st;
    const bool use_long = n_ctx_seq > hp->rope_n_ctx_orig;
    w->rope_freqs = use_long ? lng : shrt;
    if (w->rope_freqs)
        pie_log(PIE_LOG_INFO, "LongRoPE: %s factors (context %lld %s the original %d)", use_long ? "long" : "short",
                (long long)n_ctx_seq, use_long ? ">" : "<=", hp->rope_n_ctx_orig);
    return PIE_OK;
}

/* An embedding model's optional sentence-transformers projections after the output norm
 * (llama.cpp's dense_2, dense_3): [n_embd] -> [d] -> [n_embd], both or neither. */
static int32_t bind_dense(struct ggml_context *meta, const pie_hparams *hp, pie_weights *w) {
    w->dense_2 = ggml_get_tensor(meta, "dense_2.weight");
    w->dense_3 = ggml_get_tensor(meta, "dense_3.weight");
    if (!w->dense_2 && !w->dense_3) return PIE_OK;
    if (!w->dense_2 || !w->dense_3)
        return pie_set_error(PIE_ERR_FORMAT, "tensor '%s' is missing (the dense projections come in pairs)",
                             w->dense_2 ? "dense_3.weight" : "dense_2.weight");
    const int64_t d = w->dense_2->ne[1];
    int32_t st;
    if ((st = bind(meta, "dense_2.weight", hp->n_embd, d, true, &w->dense_2)) ||
        (st = bind(meta, "dense_3.weight", d, hp->n_embd, true, &w->dense_3)))
        return st;
    return PIE_OK;
}

static int32_t bind_weights(struct ggml_context *meta, pie_hparams *hp, pie_weights *w, int64_t n_ctx_seq) {
    w->tok_embd = ggml_get_tensor(meta, "token_embd.weight");
    if (!w->tok_embd) return pie_set_error(PIE_ERR_FORMAT, "tensor 'token_embd.weight' is missing");
    hp->n_vocab = (int32_t)w->tok_embd->ne[1];
    int32_t st;
    if ((st = bind(meta, "token_embd.weight", hp->n_embd, hp->n_vocab, true, &w->tok_embd)) != PIE_OK) return st;
    if (hp->arch->bind) return hp->arch->bind(meta, hp, w);
    const bool head = !(hp->arch->needs & PIE_NON_CAUSAL); /* an embedding model has none */
    if ((st = bind(meta, "output_norm.weight", hp->n_embd, 0, true, &w->output_norm)) ||
        (head && (st = bind(meta, "output.weight", hp->n_embd, hp->n_vocab, false, &w->output))) ||
        (!head && (st = bind_dense(meta, hp, w))) ||
        (st = bind_rope_factors(meta, hp, w, n_ctx_seq)))
        return st;
    if (head && !w->output) w->output = w->tok_embd; /* tied embeddings */
    if ((hp->arch->needs & PIE_NEED_ALTUP) && (st = bind_gemma3n(meta, hp, w)) != PIE_OK) return st;
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
    const int32_t k = pie_kernel_switch(w->type, false);
    if (k == 2 && w->ne[0] > m->pad_width) m->pad_width = w->ne[0];
    if (k > 2 && (m->split_cols == 0 || k - 1 < m->split_cols)) m->split_cols = k - 1;
    return PIE_OK;
}

/* Checks that the device can multiply the per-expert matrices `w` (mul_mat_id), and notes the
 * narrow pieces' width pie_matmul_id splits their products into. */
static int32_t check_experts(pie_model *m, const struct ggml_tensor *w) {
    if (!cpu_multiplies(w->type))
        return pie_set_error(PIE_ERR_UNSUPPORTED, "tensor '%s' has type %s, which ggml cannot multiply; "
                             "use a float or quantized (q*, iq*, tq*, mxfp4) weight type", w->name, ggml_type_name(w->type));
    ggml_backend_dev_t dev = m->place.dev[pie_tensor_device(m, w)];
    if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        struct ggml_init_params ip = { .mem_size = 4 * ggml_tensor_overhead(), .mem_buffer = NULL, .no_alloc = true };
        struct ggml_context *ctx = ggml_init(ip);
        if (!ctx) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot check tensor '%s'", w->name);
        struct ggml_tensor *x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, w->ne[0], 1, 1);
        struct ggml_tensor *ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, m->hp.n_expert_used, 1);
        const bool ok = ggml_backend_dev_supports_op(dev, ggml_mul_mat_id(ctx, (struct ggml_tensor *)w, x, ids));
        ggml_free(ctx);
        if (!ok)
            return pie_set_error(PIE_ERR_UNSUPPORTED, "tensor '%s' has type %s, which %s cannot multiply per expert",
                                 w->name, ggml_type_name(w->type), ggml_backend_dev_name(dev));
    }
    const int32_t k = pie_kernel_switch_id(w->type);
    if (k > 1 && (m->split_cols == 0 || k - 1 < m->split_cols)) m->split_cols = k - 1;
    return PIE_OK;
}

/* Every matrix the graph multiplies (or, for the embeddings, reads rows of). */
static int32_t check_matrices(pie_model *m) {
    const pie_weights *w = &m->w;
    m->pad_width = 0;
    m->split_cols = 0;
    int32_t st;
    if ((st = check_matrix(m, w->tok_embd)) || (w->output && (st = check_matrix(m, w->output))) ||
        (w->dense_2 && ((st = check_matrix(m, w->dense_2)) || (st = check_matrix(m, w->dense_3)))))
        return st;
    for (int il = 0; il < m->hp.n_layer; il++) {
        const pie_layer *L = &w->layers[il];
        const struct ggml_tensor *mats[] = { L->wqkv, L->wq, L->wk, L->wv, L->wo, L->ffn_gate, L->ffn_up, L->ffn_down,
                                             L->ffn_gate_inp, L->ffn_gate_inp_shexp, L->ffn_gate_shexp,
                                             L->ffn_up_shexp, L->ffn_down_shexp };
        for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++)
            if (mats[i] && (st = check_matrix(m, mats[i])) != PIE_OK) return st;
        const struct ggml_tensor *exps[] = { L->ffn_gate_exps, L->ffn_up_exps, L->ffn_down_exps };
        for (size_t i = 0; i < sizeof(exps) / sizeof(exps[0]); i++)
            if (exps[i] && (st = check_experts(m, exps[i])) != PIE_OK) return st;
        const struct ggml_tensor *altup[] = { L->inp_gate, L->proj, L->altup_correct_coef, L->altup_predict_coef,
                                              L->altup_router, L->laurel_l, L->laurel_r };
        for (size_t i = 0; i < sizeof(altup) / sizeof(altup[0]); i++)
            if (altup[i] && (st = check_matrix(m, altup[i])) != PIE_OK) return st;
    }
    const struct ggml_tensor *altup[] = { w->per_layer_tok_embd, w->per_layer_model_proj, w->altup_proj,
                                          w->altup_unembd_proj };
    for (size_t i = 0; i < sizeof(altup) / sizeof(altup[0]); i++)
        if (altup[i] && (st = check_matrix(m, altup[i])) != PIE_OK) return st;
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


/* ggml's CPU backend can store some quantized matrices interleaved (Q4_K as q4_K_8x8, ...) and
 * multiply them with its own gemv/gemm kernels (ggml-cpu/repack.cpp); that pays for every
 * product, most for batches. Only that buffer type is taken, by name: never AMX's (it crashes on
 * CPUs that advertise AMX inside VMs that do not enable it). NULL with the reason when there is
 * none to take. */
static ggml_backend_buffer_type_t repack_buft(const pie_model *m, const char **why) {
    if (!m->params.repack) { *why = "the repack option is off"; return NULL; }
    ggml_backend_dev_t cpu = m->place.dev[m->place.n_dev - 1];
    if (ggml_backend_dev_type(cpu) != GGML_BACKEND_DEVICE_TYPE_CPU) { *why = "no layer is on the CPU"; return NULL; }
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
    void *proc = reg ? ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts") : NULL;
    ggml_backend_dev_get_extra_bufts_t extra = (ggml_backend_dev_get_extra_bufts_t)proc;
    for (ggml_backend_buffer_type_t *b = extra ? extra(cpu) : NULL; b && *b; b++)
        if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
    *why = "this ggml build has no CPU_REPACK buffer type";
    return NULL;
}

/* The probe llama.cpp's loader makes: would the device multiply w ([ne0, ne1] @ [ne0, 512] f32)
 * with w in that buffer type? The repack kernels decide by type, shape and CPU features. */
static bool repack_supports(const pie_model *m, ggml_backend_buffer_type_t buft, struct ggml_tensor *w) {
    struct ggml_init_params ip = { .mem_size = 4 * ggml_tensor_overhead(), .mem_buffer = NULL, .no_alloc = true };
    struct ggml_context *ctx = ggml_init(ip);
    ggml_backend_buffer_t probe = ctx ? ggml_backend_buft_alloc_buffer(buft, 0) : NULL;
    bool ok = false;
    if (probe) {
        struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 512);
        w->buffer = probe;
        ok = ggml_backend_dev_supports_op(m->place.dev[m->place.n_dev - 1], ggml_mul_mat(ctx, w, x));
        w->buffer = NULL;
        ggml_backend_buffer_free(probe);
    }
    if (ctx) ggml_free(ctx);
    return ok;
}

/* Places the CPU's matrices the repack kernels support in a buffer of their own, repacked from
 * the file's bytes (ggml_backend_tensor_set interleaves them; they cannot be used in place from a
 * mapping). Only matrices the graph multiplies (src0 of ggml_mul_mat): not the token embedding,
 * which get_rows reads, nor a head tied to it; only those of layers placed on the CPU. Runs
 * first in place_weights, which then leaves these tensors alone. */
static int32_t place_repacked(pie_model *m, const struct gguf_context *g, FILE *f, const char *path) {
    const char *why = NULL;
    ggml_backend_buffer_type_t buft = repack_buft(m, &why);
    if (!buft) {
        pie_log(PIE_LOG_INFO, "repack off: %s", why);
        return PIE_OK;
    }
    const pie_weights *w = &m->w;
    enum { PER_LAYER = 7 };
    struct ggml_tensor **mats = malloc(sizeof(*mats) * ((size_t)m->hp.n_layer * PER_LAYER + 1));
    if (!mats) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot list the weights to repack");
    int n = 0;
    for (int il = 0; il < m->hp.n_layer; il++) {
        const pie_layer *L = &w->layers[il];
        struct ggml_tensor *layer[PER_LAYER] = { L->wq, L->wk, L->wv, L->wo, L->ffn_gate, L->ffn_up, L->ffn_down };
        for (int i = 0; i < PER_LAYER; i++) mats[n++] = layer[i];
    }
    if (w->output != w->tok_embd) mats[n++] = w->output;

    /* keep the supported ones, but not those the driver's own kernels multiply (they prepare
     * their own copy from the file's layout); size their buffer */
    int kept = 0;
    size_t total = 0;
    const size_t align = ggml_backend_buft_get_alignment(buft);
    const int cpu = m->place.n_dev - 1;
    const bool own = pie_own_kernels(m) && pie_q8_supported();
    for (int i = 0; i < n; i++) {
        if (!mats[i] || pie_tensor_device(m, mats[i]) != cpu || (own && pie_q8_takes_type(mats[i]->type)) ||
            !repack_supports(m, buft, mats[i]))
            continue;
        mats[kept++] = mats[i];
        total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, mats[i]), align);
    }
    if (kept == 0) {
        pie_log(PIE_LOG_INFO, "repack off: ggml's CPU_REPACK kernels take none of this model's matrices on this CPU%s",
                own ? " that the driver's own kernels do not" : "");
        free(mats);
        return PIE_OK;
    }
    pie_placement *pl = &m->place;
    ggml_backend_buffer_t buf = pl->n_buf < PIE_MAX_BUFFERS ? ggml_backend_buft_alloc_buffer(buft, total) : NULL;
    if (!buf) {
        free(mats);
        return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB for the repacked weights (load with repack off "
                             "to use them in place)", total / 1048576.0);
    }
    pl->buf[pl->n_buf++] = buf; /* freed with the placement's other buffers */
    m->buf_repack = buf;
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

    uint8_t *at = ggml_backend_buffer_get_base(buf), *tmp = NULL;
    size_t cap = 0;
    int32_t st = PIE_OK;
    const size_t off = gguf_get_data_offset(g);
    for (int i = 0; i < kept && st == PIE_OK; i++) {
        struct ggml_tensor *t = mats[i];
        const size_t nb = ggml_nbytes(t);
        if (ggml_backend_tensor_alloc(buf, t, at) != GGML_STATUS_SUCCESS) {
            st = pie_set_error(PIE_ERR_BACKEND, "cannot place tensor '%s' in the repack buffer", ggml_get_name(t));
            break;
        }
        at += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        if (nb > cap) {
            free(tmp);
            tmp = malloc(nb);
            cap = tmp ? nb : 0;
            if (!tmp) { st = pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes to read '%s'", nb, ggml_get_name(t)); break; }
        }
        const int64_t id = gguf_find_tensor(g, ggml_get_name(t));
        if (fseeko(f, (off_t)(off + gguf_get_tensor_offset(g, id)), SEEK_SET) != 0 || fread(tmp, 1, nb, f) != nb)
            st = pie_set_error(PIE_ERR_IO, "short read of tensor '%s' from '%s'", ggml_get_name(t), path);
        else
            ggml_backend_tensor_set(t, tmp, 0, nb); /* repacks */
        /* how pie_matmul splits products of it (see check_matrix) */
        const int32_t k = pie_kernel_switch(t->type, true);
        if (k > 2 && (m->split_cols == 0 || k - 1 < m->split_cols)) m->split_cols = k - 1;
    }
    free(tmp);
    free(mats);
    if (st != PIE_OK) return st;
    m->n_repacked = kept;
    pie_log(PIE_LOG_INFO, "repack on: %d of %d matrices (%.1f MiB) stored for ggml's CPU_REPACK kernels", kept, n,
            total / 1048576.0);
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

    const int cpu = m->place.n_dev - 1;
    int32_t st = place_repacked(m, g, f, path);
    for (int i = 0; i < n; i++)
        if (ts[i]->buffer) dev[i] = -1; /* repacked: placed and read */
    /* Mapping needs a host device and the data aligned the way ggml's CPU buffer expects. */
    const bool host = ggml_backend_buft_is_host(ggml_backend_dev_buffer_type(m->place.dev[cpu]));
    if (st == PIE_OK && m->params.use_mmap && host && gguf_get_data_offset(g) % 32 == 0) {
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
    const int64_t n_ctx_seq = (int64_t)m->params.page_size * m->params.n_pages;
    if ((st = bind_weights(meta, &m->hp, &m->w, n_ctx_seq)) != PIE_OK || (st = pie_place_layers(m)) != PIE_OK ||
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
    m->buf_repack = NULL; /* freed with the placement's buffers */
}
