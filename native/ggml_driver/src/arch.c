/*
 * arch.c — the architectures the driver supports, in one table: the loader picks a row by
 * general.architecture (graph builder, RoPE mode, optional tensors it needs), and the list of
 * names is exported (pie_arch_count / pie_arch_name) so no other place has to repeat it.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static const pie_arch archs[] = {
    { .name = "llama",  .rope_mode = 0,                   .needs = 0,                 .build = pie_build_llama },
    { .name = "qwen2",  .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_QKV_BIAS, .build = pie_build_llama },
    { .name = "qwen3",  .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_QK_NORM,  .build = pie_build_llama },
    { .name = "gemma3", .rope_mode = GGML_ROPE_TYPE_NEOX, .needs = PIE_NEED_QK_NORM | PIE_NEED_POST_NORMS,
      .load_hparams = pie_gemma3_hparams, .build = pie_build_gemma3 },
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
