/*
 * llama.c — the Llama family and its relatives (Llama 2/3, Mistral, SmolLM 2/3, TinyLlama,
 * Qwen2, Qwen3, Granite 3, Mistral 3, and the mixtures of experts Mixtral, Qwen2-MoE and
 * Qwen3-MoE): pre-norm blocks with RMS norm, RoPE, grouped-query attention, a SwiGLU FFN or
 * routed experts (moe.c). What differs between them comes from the table in arch.c and the
 * hyper-parameters its hooks read: the RoPE mode (llama rotates adjacent pairs, qwen halves),
 * QKV biases (qwen2; used whenever the file has them), a per-head RMS norm on Q and K before
 * RoPE (qwen3), layers without RoPE (SmolLM3), Granite's embedding, residual, attention and
 * logit multipliers, and Mistral 3's attention temperature. Rope frequency factors (Llama 3.1,
 * LongRoPE) are used when the file has them.
 */
#include "../internal.h"

#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Family hooks: the keys llama.cpp reads for each relative                                    */
/* ------------------------------------------------------------------------------------------ */

/*
 * Granite 3: logit_scale (required; divides the logits), residual_scale (multiplies each
 * block's output before its residual add), embedding_scale (multiplies the embeddings),
 * attention.scale (replaces 1/sqrt(head_dim)); a 0 multiplier means none, as in llama.cpp.
 * rope.scaling.finetuned false turns RoPE off in every layer (llama.cpp's switch for Granite).
 */
int32_t pie_granite_hparams(pie_hparams *hp, const struct gguf_context *g) {
    float logit = 0.0f, residual = 0.0f, embd = 0.0f, attn = 0.0f;
    int32_t st;
    if (!pie_gguf_float(g, "granite.logit_scale", &logit))
        return pie_set_error(PIE_ERR_FORMAT, "metadata key 'granite.logit_scale' is missing or not a number");
    if ((st = pie_gguf_positive(g, "granite.logit_scale", false, &logit)) ||
        (st = pie_gguf_positive(g, "granite.residual_scale", true, &residual)) ||
        (st = pie_gguf_positive(g, "granite.embedding_scale", true, &embd)) ||
        (st = pie_gguf_positive(g, "granite.attention.scale", true, &attn)))
        return st;
    hp->logit_scale = logit;
    if (residual != 0.0f) hp->residual_scale = residual;
    if (embd != 0.0f) hp->embd_scale = embd;
    hp->embd_scale_input = true;
    if (attn != 0.0f) hp->attn_scale = attn;

    if (gguf_find_key(g, "granite.deepstack_mapping") >= 0)
        return pie_set_error(PIE_ERR_UNSUPPORTED, "Granite Vision's deepstack layers (granite.deepstack_mapping) are not supported");
    const int64_t id = gguf_find_key(g, "granite.rope.scaling.finetuned");
    if (id >= 0) {
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_BOOL)
            return pie_set_error(PIE_ERR_FORMAT, "metadata key 'granite.rope.scaling.finetuned' must be a boolean");
        if (!gguf_get_val_bool(g, id)) memset(hp->no_rope, 1, sizeof(hp->no_rope));
    }
    return PIE_OK;
}

/* SmolLM3: every 4th layer (3, 7, ...) attends without RoPE. llama.cpp fixes the interval at 4
 * and reads no key for it; neither does this. */
int32_t pie_smollm3_hparams(pie_hparams *hp, const struct gguf_context *g) {
    for (int il = 0; il < hp->n_layer; il++) hp->no_rope[il] = (il + 1) % 4 == 0;
    return PIE_OK;
}

/* Mistral 3: Llama 4 style attention temperature (attention.temperature_scale, 0 = off) over
 * the original context (rope.scaling.original_context_length) that YaRN extends. */
int32_t pie_mistral3_hparams(pie_hparams *hp, const struct gguf_context *g) {
    return pie_gguf_positive(g, "mistral3.attention.temperature_scale", true, &hp->attn_temp_scale);
}

/* ------------------------------------------------------------------------------------------ */
/* Graph                                                                                      */
/* ------------------------------------------------------------------------------------------ */

void pie_build_llama(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    struct ggml_context *ctx = g->ctx;
    const bool qk_norm = hp->arch->needs & PIE_NEED_QK_NORM;

    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens] */
    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &m->w.layers[il];
        struct ggml_tensor *cur = pie_name(pie_norm(g, x, L->attn_norm), "attn_norm", il);

        struct ggml_tensor *q, *k, *v; /* [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, cur, &q, &k, &v);
        if (qk_norm) {
            q = pie_name(pie_norm(g, q, L->q_norm), "Qcur_normed", il);
            k = pie_name(pie_norm(g, k, L->k_norm), "Kcur_normed", il);
        }
        q = pie_name(pie_rope(g, q, il), "Qcur", il);
        k = pie_name(pie_rope(g, k, il), "Kcur", il);
        v = pie_name(v, "Vcur", il);
        if (hp->attn_temp_scale != 0.0f)
            q = pie_name(ggml_mul(ctx, q, pie_attn_temperature(g)), "Qcur_attn_temp_scaled", il);
        cur = pie_name(pie_attention(g, il, q, k, v, hp->attn_scale), "kqv_out", il); /* [n_head*head_dim_v, n] */
        cur = pie_name(pie_linear(g, L->wo, L->bo, cur), "attn_out", il);          /* [n_embd, n_tokens] */

        if (il == hp->n_layer - 1) { /* only the sampled rows go on */
            cur = pie_select_outputs(g, cur);
            x = pie_select_outputs(g, x);
        }
        if (hp->residual_scale != 1.0f) cur = ggml_scale(ctx, cur, hp->residual_scale);
        x = pie_name(ggml_add(ctx, x, cur), "ffn_inp", il);

        cur = pie_name(pie_norm(g, x, L->ffn_norm), "ffn_norm", il);
        cur = pie_ffn(g, L, cur, il); /* [n_embd, n]: SwiGLU, or experts when the layer has a router */
        if (hp->residual_scale != 1.0f) cur = ggml_scale(ctx, cur, hp->residual_scale);
        x = pie_name(ggml_add(ctx, x, cur), "l_out", il);
    }
    pie_graph_finish(g, x);
}
