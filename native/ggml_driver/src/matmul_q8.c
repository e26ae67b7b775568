/*
 * matmul_q8.c — products of q8_0 and q5_0 weights on x86 CPUs with AVX-512 VNNI.
 *
 * Why: ggml multiplies these types with llamafile's tinyBLAS from two columns on, which unpacks
 * each weight block again for every pair of columns and spends several scalar steps per block and
 * pair (two fp16 scales looked up and multiplied, a broadcast): 8 decode streams of the starter
 * model spent half their layers' time in its q5_0 products, and its q8_0 head (262,144 x 640, tied
 * to the token embedding) took more than half of a step. Here each 64-value piece of a weight row
 * is prepared once (two blocks unpacked to signed bytes side by side in one register, their
 * scales, their sums) and then multiplied with every column in one VNNI instruction, one convert
 * and two float operations.
 *
 * The values: the columns are quantized to q8_0 exactly as ggml-cpu's x86 code does (d = max/127
 * stored as fp16, q = round-half-even(x * 127/max)), every integer dot is exact, and only the
 * order of the float sums differs from ggml's. Each column is computed alone, by the same
 * instructions in the same order, whatever the other columns of the batch: a row's result never
 * depends on its batch, so these products need no splitting (see pie_matmul).
 *
 * A product is two custom ops: the columns quantized (once per input: Q, K and V share theirs,
 * as do gate and up), then the product, each split over the graph's threads. VNNI multiplies
 * unsigned by signed bytes, so a column is stored as q + 128 and each piece's dot is corrected by
 * -128 * (the sum of its weights).
 */
#include "internal.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PIE_MATMUL_Q8 1
#include <immintrin.h>
#endif

enum {
    BLOCK = 32,                 /* values per block (q8_0 and q5_0 alike)                     */
    PIECE = 64,                 /* values per piece: two blocks, one 512-bit register          */
    TILE_ROWS = 4,              /* weight rows prepared together                              */
    TILE_COLS = 4,              /* columns multiplied against them at once (16 accumulators)  */
    MAX_PIECES = 64,            /* the widest row taken: 4096 values (48 KiB of prepared
                                   pieces on a worker's stack)                                */
};

/* Bytes of one quantized column: PIECE unsigned bytes and 16 float scales per piece. */
static int64_t column_bytes(int64_t n_in) {
    const int64_t pieces = (n_in + PIECE - 1) / PIECE;
    return pieces * (PIECE + 16 * (int64_t)sizeof(float));
}

bool pie_q8_kernels_cpu(void) {
#ifdef PIE_MATMUL_Q8
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

bool pie_q8_kernel_takes(const pie_model *m, const struct ggml_tensor *w, const struct ggml_tensor *x) {
    return m->q8_kernels && (w->type == GGML_TYPE_Q8_0 || w->type == GGML_TYPE_Q5_0) && w->ne[0] % BLOCK == 0 &&
           w->ne[0] <= MAX_PIECES * PIECE && w->ne[2] == 1 && w->ne[3] == 1 && ggml_is_contiguous(w) && w->buffer &&
           w->buffer != m->buf_repack && ggml_backend_buffer_is_host(w->buffer) && x->type == GGML_TYPE_F32 &&
           x->ne[2] == 1 && x->ne[3] == 1;
}

#ifdef PIE_MATMUL_Q8

/* ------------------------------------------------------------------------------------------ */
/* Quantizing the columns                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* dst: I8 [column_bytes, n] <- src[0]: F32 [n_in, n] (rows contiguous). Per column: for each
 * piece, 64 bytes q + 128 (128 past n_in), then 16 floats: lanes 0-7 the first block's scale,
 * 8-15 the second's (0 past n_in). */
static void quantize_columns(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    (void)userdata;
    const struct ggml_tensor *x = dst->src[0];
    const int64_t n_in = x->ne[0], n = x->ne[1], pieces = (n_in + PIECE - 1) / PIECE;
    for (int64_t c = ith; c < n; c += nth) {
        const float *xc = (const float *)((const char *)x->data + c * x->nb[1]);
        uint8_t *out = (uint8_t *)dst->data + c * dst->nb[1];
        for (int64_t p = 0; p < pieces; p++) {
            uint8_t *q = out + p * (PIECE + 16 * sizeof(float));
            float scales[16];
            for (int half = 0; half < 2; half++) {
                const int64_t b0 = p * PIECE + half * BLOCK;
                if (b0 >= n_in) {
                    memset(q + half * BLOCK, 128, BLOCK);
                    for (int l = 0; l < 8; l++) scales[half * 8 + l] = 0.0f;
                    continue;
                }
                float amax = 0.0f;
                for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(xc[b0 + i]));
                const float d = ggml_fp16_to_fp32(ggml_fp32_to_fp16(amax / 127.f));
                const float id = amax != 0.0f ? 127.f / amax : 0.0f;
                for (int i = 0; i < BLOCK; i++) q[half * BLOCK + i] = (uint8_t)((int)nearbyintf(xc[b0 + i] * id) + 128);
                for (int l = 0; l < 8; l++) scales[half * 8 + l] = d;
            }
            memcpy(q + PIECE, scales, sizeof(scales));
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The product                                                                                */
/* ------------------------------------------------------------------------------------------ */

#define Q8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

/* One weight row's pieces, ready for the columns. */
typedef struct {
    __m512i w;     /* the two blocks' values as signed bytes                                */
    __m512i corr;  /* -128 * the sum of each 4 bytes of w (what q + 128 adds to the dot)      */
    __m512  scale; /* lanes 0-7: the first block's scale, 8-15: the second's                 */
} piece;

/* One block's 32 values as signed bytes: q8_0 {fp16 d; int8 q[32]} as stored; q5_0 {fp16 d;
 * uint32 qh; uint8 qs[16]}: value j (j < 16) is the low nibble of qs[j], value j + 16 its high
 * nibble, each with bit j (j + 16) of qh as its fifth bit, minus 16. */
Q8_TARGET static inline __m256i block_values(enum ggml_type type, const uint8_t *b) {
    if (type == GGML_TYPE_Q8_0) return _mm256_loadu_si256((const __m256i *)(b + 2));
    uint32_t qh;
    memcpy(&qh, b + 2, sizeof(qh));
    const __m128i qs = _mm_loadu_si128((const __m128i *)(b + 6)), nib = _mm_set1_epi8(0x0F);
    const __m256i low = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(qs, nib)),
                                                _mm_and_si128(_mm_srli_epi16(qs, 4), nib), 1);
    const __m256i fifth = _mm256_and_si256(_mm256_movm_epi8(qh), _mm256_set1_epi8(0x10));
    return _mm256_sub_epi8(_mm256_or_si256(low, fifth), _mm256_set1_epi8(16));
}

Q8_TARGET static void prepare_row(piece *out, enum ggml_type type, const uint8_t *row, int64_t n_in) {
    const int64_t pieces = (n_in + PIECE - 1) / PIECE, blocks = n_in / BLOCK;
    const size_t block_bytes = ggml_type_size(type);
    const __m512i bias = _mm512_set1_epi8((char)128);
    for (int64_t p = 0; p < pieces; p++) {
        const uint8_t *b0 = row + 2 * p * block_bytes, *b1 = b0 + block_bytes;
        const bool second = 2 * p + 1 < blocks;
        uint16_t d0, d1 = 0;
        memcpy(&d0, b0, 2);
        if (second) memcpy(&d1, b1, 2);
        out[p].w = _mm512_inserti64x4(_mm512_castsi256_si512(block_values(type, b0)),
                                      second ? block_values(type, b1) : _mm256_setzero_si256(), 1);
        out[p].corr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, out[p].w));
        out[p].scale = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(_cvtsh_ss(d0)))),
                                                           _mm256_castps_pd(_mm256_set1_ps(_cvtsh_ss(d1))), 1));
    }
}

/* out[c][r] for R prepared rows and C columns: every (row, column) pair sums its pieces in order
 * into its own 16 lanes, then adds the lanes; nothing depends on R, C or the other pairs. */
Q8_TARGET static inline __attribute__((always_inline)) void
multiply_tile(const piece *const *rows, int R, const uint8_t *const *cols, int C, int64_t pieces, float *const *out) {
    __m512 acc[TILE_ROWS][TILE_COLS];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pieces; p++) {
        for (int c = 0; c < C; c++) {
            const uint8_t *at = cols[c] + p * (PIECE + 16 * sizeof(float));
            const __m512i xq = _mm512_loadu_si512((const void *)at);
            const __m512 xs = _mm512_loadu_ps((const void *)(at + PIECE));
            for (int r = 0; r < R; r++) {
                const piece *w = &rows[r][p];
                const __m512i dot = _mm512_dpbusd_epi32(w->corr, xq, w->w);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w->scale, xs), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[c][r] = _mm512_reduce_add_ps(acc[r][c]);
}

/* The tile sizes as constants, so the compiler keeps the accumulators in registers. */
Q8_TARGET static void multiply(const piece *const *rows, int R, const uint8_t *const *cols, int C, int64_t pieces,
                               float *const *out) {
#define TILE(r, c) case (r) * 8 + (c): multiply_tile(rows, r, cols, c, pieces, out); return;
    switch (R * 8 + C) {
        TILE(4, 4) TILE(4, 3) TILE(4, 2) TILE(4, 1)
        TILE(3, 4) TILE(3, 3) TILE(3, 2) TILE(3, 1)
        TILE(2, 4) TILE(2, 3) TILE(2, 2) TILE(2, 1)
        TILE(1, 4) TILE(1, 3) TILE(1, 2) TILE(1, 1)
    }
#undef TILE
}

/* dst: F32 [n_out, n] <- src[0]: the weight [n_in, n_out], src[1]: the quantized columns. Thread
 * ith takes its share of weight rows, TILE_ROWS at a time, and multiplies them with every column. */
Q8_TARGET static void multiply_columns(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    (void)userdata;
    const struct ggml_tensor *w = dst->src[0], *xq = dst->src[1];
    const int64_t n_in = w->ne[0], n_out = w->ne[1], n = xq->ne[1], pieces = (n_in + PIECE - 1) / PIECE;
    const int64_t per = (n_out + nth - 1) / nth, r0 = per * ith, r1 = r0 + per < n_out ? r0 + per : n_out;
    piece prep[TILE_ROWS * MAX_PIECES];
    for (int64_t r = r0; r < r1; r += TILE_ROWS) {
        const int R = r1 - r < TILE_ROWS ? (int)(r1 - r) : TILE_ROWS;
        const piece *rows[TILE_ROWS];
        for (int i = 0; i < R; i++) {
            prepare_row(prep + i * pieces, w->type, (const uint8_t *)w->data + (r + i) * w->nb[1], n_in);
            rows[i] = prep + i * pieces;
        }
        for (int64_t c = 0; c < n; c += TILE_COLS) {
            const int C = n - c < TILE_COLS ? (int)(n - c) : TILE_COLS;
            const uint8_t *cols[TILE_COLS];
            float *out[TILE_COLS];
            for (int j = 0; j < C; j++) {
                cols[j] = (const uint8_t *)xq->data + (c + j) * xq->nb[1];
                out[j] = (float *)((char *)dst->data + (c + j) * dst->nb[1]) + r;
            }
            multiply(rows, R, cols, C, pieces, out);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The graph                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* w: q8_0 or q5_0 [n_in, n_out], x: F32 [n_in, n] -> F32 [n_out, n] (pie_q8_kernel_takes holds).
 * The last input quantized is remembered, so products of the same input share its columns. */
struct ggml_tensor *pie_q8_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x) {
    struct ggml_context *ctx = g->ctx;
    if (x != g->q8_input) {
        struct ggml_tensor *src[1] = { x->nb[0] == sizeof(float) ? x : ggml_cont(ctx, x) };
        g->q8_input = x;
        g->q8_columns = ggml_custom_4d(ctx, GGML_TYPE_I8, column_bytes(x->ne[0]), x->ne[1], 1, 1, src, 1,
                                       quantize_columns, GGML_N_TASKS_MAX, NULL); /* [column_bytes, n] */
    }
    struct ggml_tensor *args[2] = { w, g->q8_columns };
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], 1, 1, args, 2, multiply_columns, GGML_N_TASKS_MAX,
                          NULL); /* [n_out, n] */
}

#else

struct ggml_tensor *pie_q8_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x) {
    return ggml_mul_mat(g->ctx, w, x);
}

#endif
