/*
 * bert.c — BERT-style encoders, the embedding models people pull (bge, all-MiniLM, mxbai-embed,
 * nomic-embed-text): bidirectional attention (PIE_NON_CAUSAL), post-norm layers with LayerNorm
 * (weight and bias), no LM head; the hidden state is the last layer's output, with no final
 * norm (llama.cpp's t_embd for these families). What differs:
 *   bert:       token + absolute position + token-type (row 0) embeddings; Q, K, V with biases;
 *               GELU FFN with biases;
 *   nomic-bert: token + token-type embeddings, no position table: Q and K rotated (NEOX RoPE);
 *               one fused Q|K|V projection; SwiGLU FFN.
 */
#include "../internal.h"

#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Hyper-parameters and tensors                                                               */
/* ------------------------------------------------------------------------------------------ */

int32_t pie_bert_hparams(pie_hparams *hp, const struct gguf_context *g) {
    char key[160];
    /* llama.cpp runs these families as the file says; their converters write false */
    snprintf(key, sizeof(key), "%s.attention.causal", hp->arch->name);
    const int64_t id = gguf_find_key(g, key);
    if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_BOOL && gguf_get_val_bool(g, id))
        return pie_set_error(PIE_ERR_UNSUPPORTED, "%s is true: %s runs with bidirectional attention only", key,
                             hp->arch->name);
    snprintf(key, sizeof(key), "%s.attention.layer_norm_epsilon", hp->arch->name);
    if (gguf_find_key(g, key) < 0) return pie_set_error(PIE_ERR_FORMAT, "missing metadata key '%s'", key);
    return pie_gguf_positive(g, key, false, &hp->norm_eps);
}

int32_t pie_bert_bind(struct ggml_context *meta, pie_hparams *hp, pie_weights *w) {
    const int64_t E = hp->n_embd, F = hp->n_ff, Q = (int64_t)hp->n_head * hp->head_dim;
    const int64_t K = (int64_t)hp->n_head_kv * hp->head_dim, V = (int64_t)hp->n_head_kv * hp->head_dim_v;
    const int64_t O = (int64_t)hp->n_head * hp->head_dim_v;
    const bool nomic = strcmp(hp->arch->name, "nomic-bert") == 0;
    char n[96];
    int32_t st;

    /* the input embeddings: positions (bert), token types (row 0 is added), their LayerNorm */
    if (!nomic) {
        if ((st = pie_bind_tensor(meta, "position_embd.weight", E, hp->n_ctx_train, true, &w->pos_embd)) != PIE_OK) return st;
        hp->n_pos = hp->n_ctx_train;
    }
    w->type_embd = ggml_get_tensor(meta, "token_types.weight");
    if (w->type_embd) {
        if ((st = pie_bind_tensor(meta, "token_types.weight", E, w->type_embd->ne[1], true, &w->type_embd)) != PIE_OK)
            return st;
        if (w->type_embd->type != GGML_TYPE_F32) /* its row is added to f32 rows */
            return pie_set_error(PIE_ERR_UNSUPPORTED, "tensor 'token_types.weight' is %s; it must be f32",
                                 ggml_type_name(w->type_embd->type));
    }
    if ((st = pie_bind_tensor(meta, "token_embd_norm.weight", E, 0, true, &w->embd_norm)) ||
        (st = pie_bind_tensor(meta, "token_embd_norm.bias", E, 0, true, &w->embd_norm_b)))
        return st;

    for (int il = 0; il < hp->n_layer; il++) {
        pie_layer *L = &w->layers[il];
#define BIND(field, suffix, ne0, ne1, req)                                           \
    snprintf(n, sizeof(n), "blk.%d." suffix, il);                                    \
    if ((st = pie_bind_tensor(meta, n, ne0, ne1, req, &L->field)) != PIE_OK) return st;
        /* Q, K, V: fused (nomic) or three, with the biases the file has; the output projection */
        if ((st = pie_bind_attention(meta, il, E, Q, K, V, O, false, L)) != PIE_OK) return st;
        BIND(attn_out_norm, "attn_output_norm.weight", E, 0, true)
        BIND(attn_out_norm_b, "attn_output_norm.bias", E, 0, true)
        if (nomic) { BIND(ffn_gate, "ffn_gate.weight", E, F, true) }
        BIND(ffn_up, "ffn_up.weight", E, F, true)
        BIND(ffn_up_b, "ffn_up.bias", F, 0, false)
        BIND(ffn_down, "ffn_down.weight", F, E, true)
        BIND(ffn_down_b, "ffn_down.bias", E, 0, false)
        BIND(layer_out_norm, "layer_output_norm.weight", E, 0, true)
        BIND(layer_out_norm_b, "layer_output_norm.bias", E, 0, true)
#undef BIND
    }
    return PIE_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Graph                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* LayerNorm over ne0: (x - mean) / sqrt(var + eps) * w + b. */
static struct ggml_tensor *layer_norm(pie_graph *g, struct ggml_tensor *x, struct ggml_tensor *w,
                                      struct ggml_tensor *b) {
    x = ggml_norm(g->ctx, x, g->model->hp.norm_eps);
    return ggml_add(g->ctx, ggml_mul(g->ctx, x, w), b);
}

void pie_build_bert(pie_graph *g) {
    const pie_model *m = g->model;
    const pie_hparams *hp = &m->hp;
    const pie_weights *w = &m->w;
    struct ggml_context *ctx = g->ctx;

    /* input: token + token type 0 (+ position) embeddings, normalised */
    struct ggml_tensor *x = pie_embed(g); /* [n_embd, n_tokens] */
    if (w->type_embd) x = ggml_add(ctx, x, ggml_view_1d(ctx, w->type_embd, hp->n_embd, 0));
    if (w->pos_embd) x = ggml_add(ctx, ggml_get_rows(ctx, w->pos_embd, g->positions), x);
    x = pie_name(x, "inp_embd", -1);
    x = pie_name(layer_norm(g, x, w->embd_norm, w->embd_norm_b), "inp_norm", -1); /* [n_embd, n_tokens] */

    for (int il = 0; il < hp->n_layer; il++) {
        const pie_layer *L = &w->layers[il];
        struct ggml_tensor *q, *k, *v; /* [head_dim, n_head(_kv), n_tokens] */
        pie_qkv(g, L, x, &q, &k, &v);
        if (!w->pos_embd) { /* nomic-bert: positions by rotation */
            q = pie_rope(g, q, il);
            k = pie_rope(g, k, il);
        }
        q = pie_name(q, "Qcur", il);
        k = pie_name(k, "Kcur", il);
        v = pie_name(v, "Vcur", il);
        struct ggml_tensor *cur = pie_attention(g, il, q, k, v, hp->attn_scale); /* [n_head*head_dim_v, n] */
        cur = pie_name(pie_linear(g, L->wo, L->bo, cur), "kqv_out", il);       /* [n_embd, n_tokens] */

        if (il == hp->n_layer - 1) { /* only the rows the batch reads go on */
            cur = pie_select_outputs(g, cur);
            x = pie_select_outputs(g, x);
        }
        /* post-norms: residual add, then LayerNorm */
        cur = layer_norm(g, ggml_add(ctx, cur, x), L->attn_out_norm, L->attn_out_norm_b);
        struct ggml_tensor *ffn_inp = pie_name(cur, "ffn_inp", il); /* [n_embd, n] */
        if (L->ffn_gate) {
            cur = pie_ffn_swiglu(g, L, cur);                      /* nomic: silu(gate) * up -> down */
        } else {
            cur = ggml_gelu(ctx, pie_linear(g, L->ffn_up, L->ffn_up_b, cur)); /* [n_ff, n] */
            cur = pie_linear(g, L->ffn_down, L->ffn_down_b, cur);             /* [n_embd, n] */
        }
        cur = pie_name(cur, "ffn_out", il);
        x = layer_norm(g, ggml_add(ctx, cur, ffn_inp), L->layer_out_norm, L->layer_out_norm_b);
        x = pie_name(x, "l_out", il); /* [n_embd, n] */
    }

    /* no output norm, no head: the last layer's output is the hidden state */
    g->hidden = pie_name(x, "result_embd", -1); /* [n_embd, n_outputs] */
    ggml_set_output(g->hidden);
    ggml_build_forward_expand(g->gf, g->hidden);
}
