/*
 * arch.c — the architectures the driver supports, in one table: the loader picks a row by
 * general.architecture (graph builder, RoPE mode, optional tensors it needs), and the list of
 * names is exported (pie_arch_count / pie_arch_name) so no other place has to repeat it.
 * Names are llama.cpp's. Left out on purpose: "mistral4" (Mistral's MoE with DeepSeek-style
 * latent attention) and every other MoE or non-transformer family.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static const pie_arch archs[] = {
    /* llama: a Mixtral-style file (expert_count > 0) routes its FFN through experts */
    { .name = "llama",    .rope_mode = 0,                   .needs = PIE_FFN_BIAS | PIE_ALLOW_EXPERTS | PIE_MOE_NORM_WEIGHTS,
      .build = pie_build_llama },
    { .name = "qwen2",    .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_QKV_BIAS, .build = pie_build_llama },
    { .name = "qwen3",    .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_QK_NORM,  .build = pie_build_llama },
    { .name = "gemma2",   .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_POST_NORMS,
      .load_hparams = pie_gemma2_hparams, .build = pie_build_gemma },
    { .name = "gemma3",   .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_QK_NORM | PIE_NEED_POST_NORMS,
      .load_hparams = pie_gemma3_hparams, .build = pie_build_gemma },
    { .name = "phi3",     .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_FUSED_GATE_UP | PIE_LONGROPE,
      .build = pie_build_phi3 },
    { .name = "granite",  .rope_mode = 0,                   .needs = PIE_FFN_BIAS,
      .load_hparams = pie_granite_hparams, .build = pie_build_llama },
    { .name = "smollm3",  .rope_mode = 0,                   .needs = PIE_NO_ROPE_FACTORS,
      .load_hparams = pie_smollm3_hparams, .build = pie_build_llama },
    { .name = "olmo2",    .rope_mode = GGML_ROPE_TYPE_NEOX,
      .needs = PIE_NEED_QK_NORM | PIE_QK_NORM_FULL | PIE_NEED_POST_NORMS | PIE_NO_PRE_NORMS | PIE_NO_ROPE_FACTORS,
      .load_hparams = pie_olmo2_hparams, .build = pie_build_olmo2 },
    { .name = "mistral3", .rope_mode = 0,                   .needs = PIE_FFN_BIAS | PIE_YARN_KEYS,
      .load_hparams = pie_mistral3_hparams, .build = pie_build_llama },
    { .name = "qwen2moe", .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_EXPERTS | PIE_NEED_SHARED_EXPERT,
      .load_hparams = pie_qwen_moe_hparams, .build = pie_build_llama },
    { .name = "qwen3moe", .rope_mode = GGML_ROPE_TYPE_NEOX,
      .needs = PIE_NEED_QK_NORM | PIE_NEED_EXPERTS | PIE_MOE_NORM_WEIGHTS,
      .load_hparams = pie_qwen_moe_hparams, .build = pie_build_llama },
    { .name = "olmoe",    .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_QK_NORM | PIE_QK_NORM_FULL | PIE_NEED_EXPERTS,
      .build = pie_build_olmoe },
    { .name = "gpt-oss",  .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_EXPERTS | PIE_NEED_OAI_MOE,
      .load_hparams = pie_gpt_oss_hparams, .build = pie_build_gpt_oss },
    { .name = "gemma3n",  .rope_mode = GGML_ROPE_TYPE_NEOX,
      .needs = PIE_NEED_QK_NORM | PIE_NEED_POST_NORMS | PIE_NO_ROPE_FACTORS | PIE_NEED_ALTUP,
      .load_hparams = pie_gemma3n_hparams, .build = pie_build_gemma3n, .extra_nodes = pie_gemma3n_nodes },
    /* embedding models (bidirectional, no LM head) */
    { .name = "bert",       .rope_mode = 0, .needs = PIE_NON_CAUSAL,
      .load_hparams = pie_bert_hparams, .bind = pie_bert_bind, .build = pie_build_bert },
    { .name = "nomic-bert", .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NON_CAUSAL | PIE_NO_ROPE_FACTORS,
      .load_hparams = pie_bert_hparams, .bind = pie_bert_bind, .build = pie_build_bert },
    { .name = "gemma-embedding", .rope_mode = GGML_ROPE_TYPE_NEOX,
      .needs = PIE_NON_CAUSAL | PIE_NEED_QK_NORM | PIE_NEED_POST_NORMS | PIE_NO_ROPE_FACTORS,
      .load_hparams = pie_gemma_embedding_hparams, .build = pie_build_gemma },
};
enum { N_ARCHS = sizeof(archs) / sizeof(archs[0]) };

const pie_arch *pie_arch_find(const char *name) {
    for (int i = 0; i < N_ARCHS; i++)
        if (strcmp(archs[i].name, name) == 0) return &archs[i];
    return NULL;
}

void pie_arch_list(char *buf, size_t size) {
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < N_ARCHS && len < size; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s%s", i ? ", " : "", archs[i].name);
}

int32_t pie_arch_count(void) { return N_ARCHS; }

const char *pie_arch_name(int32_t index) { return index >= 0 && index < N_ARCHS ? archs[index].name : NULL; }
