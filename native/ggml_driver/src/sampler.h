/*
 * sampler.h — turning one row of logits into a token, in C, reproducibly.
 * Internal to the driver; pie_forward calls it once per output row.
 */
#ifndef PIE_SAMPLER_H
#define PIE_SAMPLER_H

#include "pie_driver.h"

/* Scratch memory reused across rows so sampling allocates nothing per token. */
typedef struct pie_sampler_scratch pie_sampler_scratch;

pie_sampler_scratch *pie_sampler_scratch_new(int32_t n_vocab);
void                 pie_sampler_scratch_free(pie_sampler_scratch *scratch);

/*
 * Samples one row.
 *   logits    [n_vocab]  raw logits (not modified)
 *   mask      [ceil(n_vocab/32)] allowed-token bitmask, or NULL for all allowed
 *   sampler   greedy when temperature <= 0; else top_k, top_p, min_p, then a draw seeded by seed
 * Writes *out_token (always). When out_logprob != NULL writes log p(token) under softmax of the
 * raw logits. When top_k > 0 writes the top_k most probable ids and probabilities (softmax of the
 * raw logits, descending) to out_top_ids / out_top_probs.
 * Returns PIE_ERR_INVALID_ARGUMENT (with pie_last_error set) when the mask allows no token or a
 * parameter is out of range (top_p outside (0,1], min_p outside [0,1], top_k < 0).
 */
int32_t pie_sample_row(pie_sampler_scratch *scratch, const float *logits, int32_t n_vocab,
                       const uint32_t *mask, const pie_sampler *sampler,
                       int32_t *out_token, float *out_logprob,
                       int32_t top_k, int32_t *out_top_ids, float *out_top_probs);

#endif /* PIE_SAMPLER_H */
