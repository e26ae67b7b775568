/*
 * sampler.h — turning rows of logits into tokens, in C, reproducibly.
 * Internal to the driver; pie_forward calls pie_sample_rows once per pass.
 */
#ifndef PIE_SAMPLER_H
#define PIE_SAMPLER_H

#include "pie_driver.h"

/* Scratch memory reused across rows so sampling allocates nothing per token: one set per
 * thread that samples (grown by pie_sample_rows to the threads it runs). */
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

/*
 * Samples n_rows rows as pie_sample_row does, on up to n_threads threads (the rows are
 * independent; each thread has its own scratch). Row r reads logits[r * n_vocab ...], masks
 * [r * ceil(n_vocab/32) ...] (masks may be NULL), samplers[r], and writes out_tokens[r],
 * out_logprobs[r] (when not NULL), top_k probes at [r * top_k ...] and out_status[r]. A row
 * that fails leaves its status there and no message (the threads' last errors are their own):
 * the caller samples it again with pie_sample_row to get the message.
 * Returns PIE_ERR_OUT_OF_MEMORY when the threads' scratch cannot be allocated, else PIE_OK.
 */
int32_t pie_sample_rows(pie_sampler_scratch *scratch, int32_t n_threads, int32_t n_rows,
                        const float *logits, int32_t n_vocab, const uint32_t *masks,
                        const pie_sampler *samplers, int32_t *out_tokens, float *out_logprobs,
                        int32_t top_k, int32_t *out_top_ids, float *out_top_probs,
                        int32_t *out_status);

#endif /* PIE_SAMPLER_H */
