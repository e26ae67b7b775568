/*
 * matmul_q8.c — products of q8_0, q5_0, q4_K and q6_K weights on x86 CPUs with AVX-512 VNNI.
 *
 * Why: ggml multiplies these types with llamafile's tinyBLAS from two columns on, which unpacks
 * each weight block again for every pair of columns and spends several scalar steps per block and
 * pair: 8 decode streams of the starter model spent half their layers' time in its q5_0 products,
 * and its q8_0 head (262,144 x 640, tied to the token embedding) took more than half of a step.
 *
 * How: the first time a graph multiplies a matrix, its rows are copied in tiles of 16 (prepared
 * once, kept for the model's life): for each 32-value block, the 16 rows' values as unsigned
 * bytes (q + 128) interleaved four at a time, so one 512-bit register holds 4 values of each of
 * the 16 rows, then the 16 rows' fp16 scales. One VNNI instruction then multiplies that register
 * with 4 values of a column broadcast to every lane: 8 instructions per block and column give the
 * 16 rows' integer dots, and one convert, one multiply and one fused add per block and column
 * apply the two scales. The mapped file's pages of a prepared matrix are released (the copy is
 * what the products read; get_rows of a tied embedding faults back the rows it reads).
 *
 * The values: the columns are quantized to q8_0 exactly as ggml-cpu's x86 code does (d = max/127
 * stored as fp16, q = round-half-even(x * 127/max)), every integer dot is exact, and only the
 * order of the float sums differs from ggml's. Each column is computed alone, by the same
 * instructions in the same order, whatever the other columns of the batch: a row's result never
 * depends on its batch, so these products need no splitting (see pie_matmul).
 *
 * A product is two custom ops: the columns quantized (once per input: Q, K and V share theirs,
 * as do gate and up), then the product, each split over the graph's threads. VNNI multiplies
 * unsigned by signed bytes; the weights are stored as q + 128, so each block's dot starts from
 * -128 * (the sum of the column's values in that block).
 *
 * The k-quants (q4_K, q6_K: super-blocks of 256 values) work the same way with q8_K columns (as
 * ggml quantizes them for these types) and their own tile layout (see tile_bytes): ggml's
 * repacked q4_K and its q6_K kernels, split into narrow products for batch invariance, took a
 * fifth of 8 decode streams' step. Gemma's gate and up products and their GEGLU are one op
 * (multiply_geglu).
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PIE_MATMUL_Q8 1
#include <immintrin.h>
#endif

enum {
    BLOCK = 32,                       /* values per block (q8_0 and q5_0 alike)               */
    TILE = 16,                        /* weight rows per tile: one int32 lane each            */
    Q8_BLOCK = TILE * BLOCK,          /* bytes of one block of a q8_0 tile's values: a byte each */
    Q5_BLOCK = TILE * BLOCK / 2 + TILE * BLOCK / 8, /* q5_0: a nibble and a bit each          */
    GROUP = 8,                        /* columns multiplied against a tile at once            */
    ALIGN = 64,
    /* bytes ahead of the block being multiplied that are asked into L1 (about 1.5 tiles of a
     * 640-wide matrix): the hardware prefetcher alone left 8 decode streams ~20% slower */
    PREFETCH_AHEAD = 16384,
};

/* One prepared matrix. */
typedef struct {
    const struct ggml_tensor *w; /* the weight it was prepared from                             */
    uint8_t *tiles;              /* ceil(n_out / 16) tiles of tile_bytes; NULL: could not be
                                    prepared (ggml's product is used)                         */
} prepared;

/* A gate and an up matrix multiplied together, their GEGLU applied in the same op. */
typedef struct {
    const struct ggml_tensor *gate, *up;
    const uint8_t *gate_tiles, *up_tiles;
    const ggml_fp16_t *gelu; /* the store's table */
} geglu_pair;

struct pie_q8_store {
    prepared *mats;
    int32_t n, cap;
    size_t bytes; /* the tiles of every prepared matrix */
    geglu_pair *pairs;
    int32_t n_pairs, cap_pairs;
    /* GELU (tanh form) of every fp16 value, rounded to fp16, as ggml-cpu tabulates it; one entry
     * more so a 4-byte gather at the last stays inside */
    ggml_fp16_t gelu[65537];
};

static size_t pad(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

/* A tile: nb blocks of 16 rows' values (block_bytes each), then nb x 16 fp16 scales. A block's
 * values form 8 registers, register j holding values 4j .. 4j+3 of each row (row r in bytes
 * 4r .. 4r+3), each as q + 128. q8_0 stores the 8 registers as they are; q5_0, to read no more
 * than its file does, stores q + 16 as a low nibble (registers j and j + 4 share bytes: j in the
 * low half) and a fifth bit (64 bits per register, after the nibbles). */
static size_t block_bytes(enum ggml_type type) { return type == GGML_TYPE_Q8_0 ? Q8_BLOCK : Q5_BLOCK; }

/* The k-quants (q4_K, q6_K) come in super-blocks of 256 values; a tile's super-block holds 16
 * rows' values as 4-bit nibbles like q5_0's (registers j and j + 4 of each 32 values share
 * bytes), unsigned as the file stores them, then what each type adds:
 *   q4_K: 8 x 16 sub-block scales, 8 x 16 sub-block mins (bytes, 6 bits used), 16 fp16 d,
 *         16 fp16 dmin: value = d * scale * q - dmin * min;
 *   q6_K: two bit planes per register (the values' bits 4 and 5), 16 x 16 signed sub-block
 *         scales (16 values each), 16 fp16 d: value = d * scale * (q - 32).
 * q4_K takes 3% more bytes than the file (its 6-bit scales and mins a byte each), q6_K 1% (whole
 * cache lines). */
static bool is_k(enum ggml_type type) { return type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q6_K; }
enum {
    QK = 256,                                       /* values per super-block                 */
    K_NIBBLES = TILE * QK / 2,                      /* 2048                                   */
    Q4K_SUPER = K_NIBBLES + 2 * 8 * TILE + 2 * TILE * 2,          /* 2368: 37 cache lines      */
    Q6K_SUPER = (K_NIBBLES + TILE * QK / 4 + 16 * TILE + TILE * 2 + ALIGN - 1) / ALIGN * ALIGN, /* 3392 */
    KGROUP = 4, /* columns multiplied against a k-quant tile at once (sums and scales need more registers) */
};

/* Blocks (q8_0, q5_0) or super-blocks (q4_K, q6_K) in a row of n_in values. */
static int64_t blocks_of(enum ggml_type type, int64_t n_in) { return n_in / (is_k(type) ? QK : BLOCK); }
static size_t tile_bytes(enum ggml_type type, int64_t nb) {
    if (type == GGML_TYPE_Q4_K) return (size_t)nb * Q4K_SUPER;
    if (type == GGML_TYPE_Q6_K) return (size_t)nb * Q6K_SUPER;
    return pad((size_t)nb * (block_bytes(type) + TILE * sizeof(ggml_fp16_t)));
}

/* A quantized column for q8_0 and q5_0 weights: nb x 32 signed values, nb int32 starts (-128 x
 * the block's sum), nb float scales. */
static size_t column_bytes(int64_t nb) { return pad((size_t)nb * (BLOCK + sizeof(int32_t) + sizeof(float))); }
/* For k-quant weights (q8_K, as ggml quantizes them): nk x 256 signed values, nk float scales,
 * nk x 16 int32 sums of 16 values. */
static size_t column_bytes_k(int64_t nk) { return pad((size_t)nk * (QK + sizeof(float) + 16 * sizeof(int32_t))); }

bool pie_q8_supported(void) {
#ifdef PIE_MATMUL_Q8
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

bool pie_q8_takes_type(enum ggml_type type) {
    return type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q5_0 || type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q6_K;
}

int32_t pie_q8_open(pie_model *m) {
    m->q8 = calloc(1, sizeof(*m->q8));
    if (!m->q8) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate the q8 kernels' store");
    /* ggml-cpu's table, entry for entry: ggml builds for the host CPU with fused multiply-adds
     * contracted, which turns its 1 + 0.044715 x^2 into one fma (the unfused form differs from
     * its table in one entry of the 65,536) */
    for (uint32_t i = 0; i < 65536; i++) {
        const float x = ggml_fp16_to_fp32((ggml_fp16_t)i);
        m->q8->gelu[i] = ggml_fp32_to_fp16(0.5f * x * (1.0f + tanhf(0.79788456080286535587989211986876f * x * fmaf(0.044715f * x, x, 1.0f))));
    }
    pie_log(PIE_LOG_INFO, "q8_0, q5_0, q4_K and q6_K products: AVX-512 VNNI kernels (matmul_q8.c)");
    return PIE_OK;
}

void pie_q8_free(pie_model *m) {
    if (!m->q8) return;
    for (int32_t i = 0; i < m->q8->n; i++) free(m->q8->mats[i].tiles);
    free(m->q8->mats);
    free(m->q8->pairs);
    free(m->q8);
    m->q8 = NULL;
}

void pie_q8_log_prepared(const pie_model *m) {
    if (!m->q8) return;
    int32_t n = 0;
    for (int32_t i = 0; i < m->q8->n; i++) n += m->q8->mats[i].tiles != NULL;
    pie_log(PIE_LOG_INFO, "q8 kernels: %d matrices prepared (%.1f MiB; their mapped pages released)", n,
            m->q8->bytes / 1048576.0);
}

#ifdef PIE_MATMUL_Q8

#define Q8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

/* ------------------------------------------------------------------------------------------ */
/* Preparing a matrix                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* The rows of tile t of an n_out-row matrix: 16 but in the last. */
static inline int tile_rows(int64_t n_out, int64_t t) { return n_out - t * TILE < TILE ? (int)(n_out - t * TILE) : TILE; }

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

/* rows (<= 16) weight rows -> one tile. Rows past the matrix stay zero (value 0, scale 0). */
Q8_TARGET static void prepare_tile(uint8_t *tile, const struct ggml_tensor *w, int64_t r0, int rows, int64_t nb) {
    const size_t in_bytes = ggml_type_size(w->type), out_bytes = block_bytes(w->type);
    const bool q8 = w->type == GGML_TYPE_Q8_0;
    uint8_t *scales = tile + nb * out_bytes;
    memset(tile, q8 ? 128 : 0x00, (size_t)nb * out_bytes);
    if (!q8) /* the padding rows' q5_0 zero: q + 16 = 16, a fifth bit */
        for (int64_t b = 0; b < nb; b++)
            for (int i = rows * 4; i < 64; i++)
                for (int j = 0; j < 8; j++) tile[b * out_bytes + 256 + j * 8 + i / 8] |= (uint8_t)(1u << (i % 8));
    memset(scales, 0, (size_t)nb * TILE * sizeof(ggml_fp16_t));
    for (int r = 0; r < rows; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (r0 + r) * w->nb[1];
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * in_bytes;
            uint8_t *out = tile + b * out_bytes;
            uint8_t v[BLOCK]; /* q + 128 */
            _mm256_storeu_si256((__m256i *)v, _mm256_xor_si256(block_values(w->type, blk), _mm256_set1_epi8((char)0x80)));
            for (int j = 0; j < BLOCK / 4; j++)
                for (int i = 0; i < 4; i++) {
                    const int at = r * 4 + i; /* the value's byte in register j */
                    if (q8) {
                        out[j * 64 + at] = v[4 * j + i];
                    } else {
                        const uint8_t q16 = (uint8_t)(v[4 * j + i] - 112); /* q + 16: 0 .. 31 */
                        out[(j % 4) * 64 + at] |= (uint8_t)((q16 & 0x0F) << (j < 4 ? 0 : 4));
                        if (q16 & 0x10) out[256 + j * 8 + at / 8] |= (uint8_t)(1u << (at % 8));
                    }
                }
            memcpy(scales + (b * TILE + r) * sizeof(ggml_fp16_t), blk, sizeof(ggml_fp16_t)); /* d */
        }
    }
}

/* Row r's 256 values of one super-block (b: the file's block), as the unsigned q the file stores
 * (q4_K 0..15, q6_K 0..63), and its sub-block scales (and q4_K's mins). */
static void super_block_values(enum ggml_type type, const uint8_t *b, uint8_t q[QK], int8_t *scales, uint8_t *mins) {
    if (type == GGML_TYPE_Q4_K) { /* {fp16 d, dmin; u8 scales[12]; u8 qs[128]} */
        const uint8_t *sc = b + 4, *qs = b + 16;
        for (int v = 0; v < QK; v++) /* 64 values per 32 bytes: low nibbles, then high ones */
            q[v] = (uint8_t)((qs[(v / 64) * 32 + v % 32] >> (v % 64 < 32 ? 0 : 4)) & 0x0F);
        for (int j = 0; j < 8; j++) { /* 6-bit scale and min of each 32 values */
            const int scale = j < 4 ? sc[j] & 63 : (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4);
            const int min = j < 4 ? sc[j + 4] & 63 : (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
            scales[j] = (int8_t)scale;
            mins[j] = (uint8_t)min;
        }
        return;
    }
    /* q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}: per 128 values, quarter k of 32 reads
     * ql[l + 32 (k % 2)] (low nibble for k < 2, high after) and bits 2k, 2k + 1 of qh[l] */
    const uint8_t *ql = b, *qh = b + 128;
    for (int v = 0; v < QK; v++) {
        const int half = v / 128, k = (v % 128) / 32, l = v % 32;
        const int low = (ql[half * 64 + (k % 2) * 32 + l] >> (k < 2 ? 0 : 4)) & 0x0F;
        q[v] = (uint8_t)(low | (((qh[half * 32 + l] >> (2 * k)) & 3) << 4));
    }
    memcpy(scales, b + 192, 16);
}

/* rows (<= 16) rows of a q4_K or q6_K matrix -> one tile (layout above tile_bytes). Rows past
 * the matrix stay zero: value 0, scales 0. */
static void prepare_tile_k(uint8_t *tile, const struct ggml_tensor *w, int64_t r0, int rows, int64_t nk) {
    const bool q4 = w->type == GGML_TYPE_Q4_K;
    const size_t in_bytes = ggml_type_size(w->type), super = tile_bytes(w->type, 1);
    memset(tile, 0, (size_t)nk * super);
    for (int r = 0; r < rows; r++) {
        const uint8_t *row = (const uint8_t *)w->data + (r0 + r) * w->nb[1];
        for (int64_t b = 0; b < nk; b++) {
            const uint8_t *blk = row + b * in_bytes;
            uint8_t *out = tile + b * super, q[QK], mins[8] = { 0 };
            int8_t scales[16];
            super_block_values(w->type, blk, q, scales, mins);
            for (int v = 0; v < QK; v++) { /* 32-value chunk, register j of it, byte i of the row's 4 */
                const int chunk = v / 32, j = (v % 32) / 4, at = r * 4 + v % 4;
                out[chunk * 256 + (j % 4) * 64 + at] |= (uint8_t)((q[v] & 0x0F) << (j < 4 ? 0 : 4));
                if (!q4) /* bit planes: chunk's register j, bit 4 then bit 5 */
                    for (int bit = 0; bit < 2; bit++)
                        if (q[v] & (0x10 << bit)) out[K_NIBBLES + (chunk * 8 + j) * 16 + bit * 8 + at / 8] |= (uint8_t)(1u << (at % 8));
            }
            if (q4) {
                uint8_t *sc = out + K_NIBBLES, *mn = sc + 8 * TILE, *d = mn + 8 * TILE;
                for (int j = 0; j < 8; j++) {
                    sc[j * TILE + r] = (uint8_t)scales[j];
                    mn[j * TILE + r] = mins[j];
                }
                memcpy(d + r * 2, blk, 2);                /* d    */
                memcpy(d + TILE * 2 + r * 2, blk + 2, 2); /* dmin */
            } else {
                uint8_t *sc = out + K_NIBBLES + TILE * QK / 4, *d = sc + 16 * TILE;
                for (int j = 0; j < 16; j++) sc[j * TILE + r] = (uint8_t)scales[j];
                memcpy(d + r * 2, blk + 208, 2); /* d */
            }
        }
    }
}

/* The pages of the mapped file inside [data, data + n) go back to the page cache: the products
 * read the prepared copy now, and anything else reading the weight faults its pages back in. */
static void release_mapped(const pie_model *m, const void *data, size_t n) {
    const uintptr_t map = (uintptr_t)m->map_addr, at = (uintptr_t)data, page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (!m->map_addr || at < map || at + n > map + m->map_size) return;
    const uintptr_t lo = (at + page - 1) / page * page, hi = (at + n) / page * page;
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

/* The prepared tiles of w, preparing them on first use; NULL when they could not be. */
static const uint8_t *prepared_tiles(const pie_model *m, const struct ggml_tensor *w) {
    pie_q8_store *s = m->q8;
    for (int32_t i = 0; i < s->n; i++)
        if (s->mats[i].w == w) return s->mats[i].tiles;
    if (s->n == s->cap) {
        const int32_t cap = s->cap ? 2 * s->cap : 64;
        prepared *mats = realloc(s->mats, sizeof(*mats) * (size_t)cap);
        if (!mats) return NULL;
        s->mats = mats;
        s->cap = cap;
    }
    const int64_t nb = blocks_of(w->type, w->ne[0]), n_tiles = (w->ne[1] + TILE - 1) / TILE;
    const size_t bytes = (size_t)n_tiles * tile_bytes(w->type, nb);
    uint8_t *tiles = aligned_alloc(ALIGN, bytes);
    if (tiles) {
        for (int64_t t = 0; t < n_tiles; t++) {
            const int rows = tile_rows(w->ne[1], t);
            if (is_k(w->type)) prepare_tile_k(tiles + t * tile_bytes(w->type, nb), w, t * TILE, rows, nb);
            else prepare_tile(tiles + t * tile_bytes(w->type, nb), w, t * TILE, rows, nb);
        }
        release_mapped(m, w->data, ggml_nbytes(w));
        s->bytes += bytes;
    } else {
        pie_log(PIE_LOG_WARN, "no memory to prepare '%s' for the q8 kernels (%.1f MiB): ggml multiplies it", ggml_get_name(w),
                bytes / 1048576.0);
    }
    s->mats[s->n++] = (prepared){ .w = w, .tiles = tiles };
    return tiles;
}

/* ------------------------------------------------------------------------------------------ */
/* Quantizing the columns                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* dst: I8 [column_bytes, n] <- src[0]: F32 [n_in, n] (rows contiguous), in column_bytes' layout. */
Q8_TARGET static void quantize_columns(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    (void)userdata;
    const struct ggml_tensor *x = dst->src[0];
    const int64_t n_in = x->ne[0], n = x->ne[1], nb = n_in / BLOCK;
    for (int64_t c = ith; c < n; c += nth) {
        const float *xc = (const float *)((const char *)x->data + c * x->nb[1]);
        int8_t *q = (int8_t *)dst->data + c * dst->nb[1];
        int32_t *start = (int32_t *)(q + nb * BLOCK);
        float *scale = (float *)(start + nb);
        for (int64_t b = 0; b < nb; b++) { /* 32 values: two registers */
            const __m512 lo = _mm512_loadu_ps(xc + b * BLOCK), hi = _mm512_loadu_ps(xc + b * BLOCK + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
            const int rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC; /* half to even, as ggml */
            const __m512i qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(lo, id), rounding));
            const __m512i qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(hi, id), rounding));
            _mm_storeu_si128((__m128i *)(q + b * BLOCK), _mm512_cvtepi32_epi8(qlo));
            _mm_storeu_si128((__m128i *)(q + b * BLOCK + 16), _mm512_cvtepi32_epi8(qhi));
            start[b] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
            scale[b] = ggml_fp16_to_fp32(ggml_fp32_to_fp16(amax / 127.f));
        }
    }
}

/* dst: I8 [column_bytes_k, n] <- src[0]: F32 [n_in, n], each 256 values quantized as ggml's
 * quantize_row_q8_K does: the value of largest magnitude (the first such) max, q =
 * round-half-even(x * -127 / max) capped at 127, d = 1 / (-127 / max), and the sums of each 16. */
Q8_TARGET static void quantize_columns_k(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    (void)userdata;
    const struct ggml_tensor *x = dst->src[0];
    const int64_t n_in = x->ne[0], n = x->ne[1], nk = n_in / QK;
    for (int64_t c = ith; c < n; c += nth) {
        const float *xc = (const float *)((const char *)x->data + c * x->nb[1]);
        int8_t *q = (int8_t *)dst->data + c * dst->nb[1];
        float *scale = (float *)(q + nk * QK);
        int32_t *sums = (int32_t *)(scale + nk);
        for (int64_t b = 0; b < nk; b++) {
            const float *v = xc + b * QK;
            __m512 amax = _mm512_setzero_ps();
            for (int i = 0; i < QK; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(v + i)));
            const float a = _mm512_reduce_max_ps(amax);
            float max = 0.0f;
            for (int i = 0; i < QK && a != 0.0f; i += 16) { /* the first value of that magnitude, with its sign */
                const __mmask16 at = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(v + i)), _mm512_set1_ps(a), _CMP_EQ_OQ);
                if (at) { max = v[i + __builtin_ctz(at)]; break; }
            }
            if (a == 0.0f) {
                memset(q + b * QK, 0, QK);
                memset(sums + b * 16, 0, 16 * sizeof(int32_t));
                scale[b] = 0.0f;
                continue;
            }
            const float iscale = -127.f / max;
            const __m512 is = _mm512_set1_ps(iscale);
            for (int i = 0; i < QK; i += 16) {
                const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(v + i), is), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m512i qi = _mm512_min_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(127));
                _mm_storeu_si128((__m128i *)(q + b * QK + i), _mm512_cvtepi32_epi8(qi));
                sums[b * 16 + i / 16] = _mm512_reduce_add_epi32(qi);
            }
            scale[b] = 1.0f / iscale;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The product                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* The lanes a tile's rows fill. */
Q8_TARGET static inline __mmask16 rows_mask(int rows) {
    return rows == TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
}

/* Thread ith's share of n_tiles tiles: [*t0, *t1). */
static inline void thread_tiles(int64_t n_tiles, int ith, int nth, int64_t *t0, int64_t *t1) {
    const int64_t per = (n_tiles + nth - 1) / nth;
    *t0 = per * ith < n_tiles ? per * ith : n_tiles;
    *t1 = *t0 + per < n_tiles ? *t0 + per : n_tiles;
}

/* acc + the 16 lanes' 4-byte dots of w (unsigned) with the 4 signed bytes at x, broadcast by the
 * instruction itself (compilers load the broadcast separately: twice the instructions). */
Q8_TARGET static inline __m512i dpbusd_broadcast(__m512i acc, __m512i w, const int8_t *x) {
#if defined(__GNUC__) && !defined(__clang__)
    __asm__("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*(const int32_t *)x));
    return acc;
#else
    int32_t x4;
    memcpy(&x4, x, sizeof(x4));
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4));
#endif
}

/* Block b's 8 registers of values (q + 128). */
Q8_TARGET static inline __attribute__((always_inline)) void
block_registers(__m512i w[8], enum ggml_type type, const uint8_t *v) {
    if (type == GGML_TYPE_Q8_0) {
        for (int j = 0; j < 8; j++) w[j] = _mm512_load_si512((const void *)(v + j * 64));
        return;
    }
    const __m512i low = _mm512_set1_epi8(0x0F), to128 = _mm512_set1_epi8(112), fifth = _mm512_set1_epi8(16);
    for (int j = 0; j < 4; j++) {
        const __m512i pair = _mm512_load_si512((const void *)(v + j * 64));
        w[j] = _mm512_and_si512(pair, low);
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(pair, 4), low);
    }
    for (int j = 0; j < 8; j++) {
        uint64_t bits;
        memcpy(&bits, v + 256 + j * 8, sizeof(bits));
        w[j] = _mm512_mask_add_epi8(_mm512_add_epi8(w[j], to128), _cvtu64_mask64(bits), _mm512_add_epi8(w[j], to128), fifth);
    }
}

/* One tile's 16 rows times C columns: out[c][0..rows). Each column's lanes run the same
 * instructions in the same order whatever C is. */
Q8_TARGET static inline __attribute__((always_inline)) void
multiply_group(enum ggml_type type, const uint8_t *tile, int64_t nb, const int8_t *const *cols, int C, float *const *out,
               int rows) {
    const uint8_t *scales = tile + nb * block_bytes(type);
    __m512 acc[GROUP];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(scales + b * TILE * sizeof(ggml_fp16_t)))); /* 16 rows' d */
        __m512i w[8], dot[GROUP];
        for (size_t at = 0; at < block_bytes(type); at += 64) /* never faults, even past the end */
            _mm_prefetch((const char *)(tile + b * block_bytes(type) + at + PREFETCH_AHEAD), _MM_HINT_T0);
        block_registers(w, type, tile + b * block_bytes(type));
        for (int c = 0; c < C; c++) {
            int32_t start;
            memcpy(&start, cols[c] + nb * BLOCK + b * sizeof(int32_t), sizeof(start));
            dot[c] = _mm512_set1_epi32(start);
        }
        for (int j = 0; j < BLOCK / 4; j++) /* values 4j .. 4j+3 of 16 rows times those of each column */
            for (int c = 0; c < C; c++) dot[c] = dpbusd_broadcast(dot[c], w[j], cols[c] + b * BLOCK + 4 * j);
        for (int c = 0; c < C; c++) {
            float dx;
            memcpy(&dx, cols[c] + nb * (BLOCK + sizeof(int32_t)) + b * sizeof(float), sizeof(dx));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[c]), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm512_mask_storeu_ps(out[c], rows_mask(rows), acc[c]);
}

/* The type and group size as constants, so the compiler keeps dots and sums in registers. */
Q8_TARGET static void multiply(enum ggml_type type, const uint8_t *tile, int64_t nb, const int8_t *const *cols, int C,
                               float *const *out, int rows) {
#define GROUP_OF(t, c) case c: multiply_group(t, tile, nb, cols, c, out, rows); return;
    if (type == GGML_TYPE_Q8_0) {
        switch (C) { GROUP_OF(GGML_TYPE_Q8_0, 1) GROUP_OF(GGML_TYPE_Q8_0, 2) GROUP_OF(GGML_TYPE_Q8_0, 3)
                     GROUP_OF(GGML_TYPE_Q8_0, 4) GROUP_OF(GGML_TYPE_Q8_0, 5) GROUP_OF(GGML_TYPE_Q8_0, 6)
                     GROUP_OF(GGML_TYPE_Q8_0, 7) GROUP_OF(GGML_TYPE_Q8_0, 8) }
    } else {
        switch (C) { GROUP_OF(GGML_TYPE_Q5_0, 1) GROUP_OF(GGML_TYPE_Q5_0, 2) GROUP_OF(GGML_TYPE_Q5_0, 3)
                     GROUP_OF(GGML_TYPE_Q5_0, 4) GROUP_OF(GGML_TYPE_Q5_0, 5) GROUP_OF(GGML_TYPE_Q5_0, 6)
                     GROUP_OF(GGML_TYPE_Q5_0, 7) GROUP_OF(GGML_TYPE_Q5_0, 8) }
    }
#undef GROUP_OF
}

/* One k-quant tile's 16 rows times C (<= KGROUP) q8_K columns. Per 32 values the nibbles give 8
 * registers of unsigned values; each sub-block's integer dot is exact, scaled by its integer
 * sub-block scale and summed as integers over the super-block (q6_K's -32 offset and q4_K's mins
 * through the columns' sums), then scaled by d (and dmin) and the column's d in float: ggml's
 * vec_dot_q4_K_q8_K / vec_dot_q6_K_q8_K arithmetic, summed in another float order. */
Q8_TARGET static inline __attribute__((always_inline)) void
multiply_group_k(enum ggml_type type, const uint8_t *tile, int64_t nk, const int8_t *const *cols, int C, float *const *out,
                 int rows) {
    const bool q4 = type == GGML_TYPE_Q4_K;
    const size_t super = q4 ? Q4K_SUPER : Q6K_SUPER;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[KGROUP];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nk; b++) {
        const uint8_t *sb = tile + b * super;
        __m512i isum[KGROUP], msum[KGROUP];
        for (int c = 0; c < C; c++) isum[c] = msum[c] = _mm512_setzero_si512();
        for (size_t at = 0; at < super; at += 64)
            _mm_prefetch((const char *)(sb + at + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int chunk = 0; chunk < 8; chunk++) { /* 32 values */
            __m512i w[8];
            for (int j = 0; j < 4; j++) {
                const __m512i pair = _mm512_loadu_si512((const void *)(sb + chunk * 256 + j * 64));
                w[j] = _mm512_and_si512(pair, low);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(pair, 4), low);
            }
            if (q4) {
                const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sb + K_NIBBLES + chunk * TILE)));
                const __m512i mn = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sb + K_NIBBLES + (8 + chunk) * TILE)));
                for (int c = 0; c < C; c++) {
                    const int8_t *x = cols[c] + b * QK + chunk * 32;
                    __m512i dot = _mm512_setzero_si512();
                    for (int j = 0; j < 8; j++) dot = dpbusd_broadcast(dot, w[j], x + 4 * j);
                    const int32_t *sums = (const int32_t *)(cols[c] + nk * (QK + sizeof(float))) + b * 16 + chunk * 2;
                    isum[c] = _mm512_add_epi32(isum[c], _mm512_mullo_epi32(dot, sc));
                    msum[c] = _mm512_add_epi32(msum[c], _mm512_mullo_epi32(mn, _mm512_set1_epi32(sums[0] + sums[1])));
                }
            } else {
                const uint8_t *planes = sb + K_NIBBLES + chunk * 8 * 16;
                for (int j = 0; j < 8; j++) {
                    uint64_t b4, b5;
                    memcpy(&b4, planes + j * 16, 8);
                    memcpy(&b5, planes + j * 16 + 8, 8);
                    w[j] = _mm512_mask_add_epi8(w[j], _cvtu64_mask64(b4), w[j], _mm512_set1_epi8(16));
                    w[j] = _mm512_mask_add_epi8(w[j], _cvtu64_mask64(b5), w[j], _mm512_set1_epi8(32));
                }
                const uint8_t *scales = sb + K_NIBBLES + TILE * QK / 4;
                const __m512i sc0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(scales + (2 * chunk) * TILE)));
                const __m512i sc1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(scales + (2 * chunk + 1) * TILE)));
                for (int c = 0; c < C; c++) {
                    const int8_t *x = cols[c] + b * QK + chunk * 32;
                    const int32_t *sums = (const int32_t *)(cols[c] + nk * (QK + sizeof(float))) + b * 16 + chunk * 2;
                    __m512i d0 = _mm512_set1_epi32(-32 * sums[0]), d1 = _mm512_set1_epi32(-32 * sums[1]);
                    for (int j = 0; j < 4; j++) d0 = dpbusd_broadcast(d0, w[j], x + 4 * j);
                    for (int j = 4; j < 8; j++) d1 = dpbusd_broadcast(d1, w[j], x + 4 * j);
                    isum[c] = _mm512_add_epi32(isum[c], _mm512_add_epi32(_mm512_mullo_epi32(d0, sc0), _mm512_mullo_epi32(d1, sc1)));
                }
            }
        }
        const uint8_t *d = sb + (q4 ? K_NIBBLES + 16 * TILE : K_NIBBLES + TILE * QK / 4 + 16 * TILE);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
        const __m512 mw = q4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + TILE * 2))) : _mm512_setzero_ps();
        for (int c = 0; c < C; c++) {
            float dx;
            memcpy(&dx, cols[c] + nk * QK + b * sizeof(float), sizeof(dx));
            const __m512 dxv = _mm512_set1_ps(dx);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), _mm512_mul_ps(dw, dxv), acc[c]);
            if (q4) acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[c]), _mm512_mul_ps(mw, dxv), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm512_mask_storeu_ps(out[c], rows_mask(rows), acc[c]);
}

/* Any tile type times C (<= GROUP) columns: the k-quants KGROUP at a time. */
Q8_TARGET static void multiply_tile(enum ggml_type type, const uint8_t *tile, int64_t nb, const int8_t *const *cols, int C,
                                    float *const *out, int rows) {
    if (!is_k(type)) {
        multiply(type, tile, nb, cols, C, out, rows);
        return;
    }
#define K_GROUP_OF(t, c) case c: multiply_group_k(t, tile, nb, cols + g, c, out + g, rows); break;
    for (int g = 0; g < C; g += KGROUP) {
        const int n = C - g < KGROUP ? C - g : KGROUP;
        if (type == GGML_TYPE_Q4_K) {
            switch (n) { K_GROUP_OF(GGML_TYPE_Q4_K, 1) K_GROUP_OF(GGML_TYPE_Q4_K, 2) K_GROUP_OF(GGML_TYPE_Q4_K, 3)
                         K_GROUP_OF(GGML_TYPE_Q4_K, 4) }
        } else {
            switch (n) { K_GROUP_OF(GGML_TYPE_Q6_K, 1) K_GROUP_OF(GGML_TYPE_Q6_K, 2) K_GROUP_OF(GGML_TYPE_Q6_K, 3)
                         K_GROUP_OF(GGML_TYPE_Q6_K, 4) }
        }
    }
#undef K_GROUP_OF
}

/* dst: F32 [n_out, n] <- src[0]: the weight [n_in, n_out] (for its shape), src[1]: the quantized
 * columns; userdata: the weight's tiles. Thread ith takes its share of tiles and multiplies each
 * with every column, GROUP at a time. */
Q8_TARGET static void multiply_columns(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const struct ggml_tensor *w = dst->src[0], *xq = dst->src[1];
    const uint8_t *tiles = userdata;
    const int64_t n_out = w->ne[1], nb = blocks_of(w->type, w->ne[0]), n = xq->ne[1], n_tiles = (n_out + TILE - 1) / TILE;
    int64_t t0, t1;
    thread_tiles(n_tiles, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        const int rows = tile_rows(n_out, t);
        for (int64_t c = 0; c < n; c += GROUP) {
            const int C = n - c < GROUP ? (int)(n - c) : GROUP;
            const int8_t *cols[GROUP];
            float *out[GROUP];
            for (int j = 0; j < C; j++) {
                cols[j] = (const int8_t *)xq->data + (c + j) * xq->nb[1];
                out[j] = (float *)((char *)dst->data + (c + j) * dst->nb[1]) + t * TILE;
            }
            multiply_tile(w->type, tiles + t * tile_bytes(w->type, nb), nb, cols, C, out, rows);
        }
    }
}

/* GEGLU of 16 rows of gate and up, as ggml-cpu computes it: gelu from the fp16 table at the
 * fp16-rounded gate value, 0 at or below -10, the value itself at or above 10. */
Q8_TARGET static inline __m512 geglu16(__m512 gate, __m512 up, const ggml_fp16_t *table) {
    const __m256i h = _mm512_cvtps_ph(gate, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i at = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(h), (const void *)table, 2); /* low half: the entry */
    __m512 y = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(at));
    y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(gate, _mm512_set1_ps(10.0f), _CMP_GE_OQ), gate);
    y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(gate, _mm512_set1_ps(-10.0f), _CMP_GT_OQ) |
                            _mm512_cmp_ps_mask(gate, gate, _CMP_UNORD_Q), y);
    return _mm512_mul_ps(y, up);
}

/* dst: F32 [n_ff, n] <- src[0]: gate [n_in, n_ff], src[1]: up (same type and shape), src[2]: the
 * quantized columns; userdata: their pair. One op instead of three: a thread multiplies its
 * tiles of both matrices and applies GEGLU to them, so the activation is spread over the threads
 * (ggml's splits it by tokens: one decode token left one thread doing all of it). */
Q8_TARGET static void multiply_geglu(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const geglu_pair *p = userdata;
    const struct ggml_tensor *w = dst->src[0], *xq = dst->src[2];
    const int64_t n_out = w->ne[1], nb = blocks_of(w->type, w->ne[0]), n = xq->ne[1], n_tiles = (n_out + TILE - 1) / TILE;
    const size_t bytes = tile_bytes(w->type, nb);
    float gate[GROUP][TILE], up[GROUP][TILE];
    float *gate_out[GROUP], *up_out[GROUP];
    for (int j = 0; j < GROUP; j++) {
        gate_out[j] = gate[j];
        up_out[j] = up[j];
    }
    int64_t t0, t1;
    thread_tiles(n_tiles, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        const __mmask16 keep = rows_mask(tile_rows(n_out, t));
        for (int64_t c = 0; c < n; c += GROUP) {
            const int C = n - c < GROUP ? (int)(n - c) : GROUP;
            const int8_t *cols[GROUP];
            for (int j = 0; j < C; j++) cols[j] = (const int8_t *)xq->data + (c + j) * xq->nb[1];
            multiply_tile(w->type, p->gate_tiles + t * bytes, nb, cols, C, gate_out, TILE);
            multiply_tile(w->type, p->up_tiles + t * bytes, nb, cols, C, up_out, TILE);
            for (int j = 0; j < C; j++) {
                float *out = (float *)((char *)dst->data + (c + j) * dst->nb[1]) + t * TILE;
                _mm512_mask_storeu_ps(out, keep, geglu16(_mm512_loadu_ps(gate[j]), _mm512_loadu_ps(up[j]), p->gelu));
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The graph                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static bool takes(const pie_model *m, const struct ggml_tensor *w, const struct ggml_tensor *x) {
    return m->q8 && pie_q8_takes_type(w->type) && w->ne[0] % (is_k(w->type) ? QK : BLOCK) == 0 && w->ne[2] == 1 &&
           w->ne[3] == 1 && ggml_is_contiguous(w) && w->buffer && w->buffer != m->buf_repack &&
           ggml_backend_buffer_is_host(w->buffer) && x->type == GGML_TYPE_F32 && x->ne[2] == 1 && x->ne[3] == 1;
}

/* x quantized for w's type: [column_bytes(_k), n]; the last input of each kind is remembered,
 * so products of the same input (Q, K and V; gate and up) share its columns. */
static struct ggml_tensor *columns(pie_graph *g, const struct ggml_tensor *w, struct ggml_tensor *x) {
    const bool k = is_k(w->type);
    struct ggml_tensor **input = k ? &g->q8k_input : &g->q8_input, **cols = k ? &g->q8k_columns : &g->q8_columns;
    if (x != *input) {
        struct ggml_tensor *src[1] = { x->nb[0] == sizeof(float) ? x : ggml_cont(g->ctx, x) };
        const size_t bytes = k ? column_bytes_k(x->ne[0] / QK) : column_bytes(x->ne[0] / BLOCK);
        *input = x;
        *cols = ggml_custom_4d(g->ctx, GGML_TYPE_I8, (int64_t)bytes, x->ne[1], 1, 1, src, 1,
                               k ? quantize_columns_k : quantize_columns, GGML_N_TASKS_MAX, NULL); /* [bytes, n] */
    }
    return *cols;
}

/* w: [n_in, n_out], x: F32 [n_in, n] -> F32 [n_out, n], or NULL when these kernels do not take w. */
struct ggml_tensor *pie_q8_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x) {
    const uint8_t *tiles = takes(g->model, w, x) ? prepared_tiles(g->model, w) : NULL;
    if (!tiles) return NULL;
    struct ggml_tensor *args[2] = { w, columns(g, w, x) };
    return ggml_custom_4d(g->ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], 1, 1, args, 2, multiply_columns, GGML_N_TASKS_MAX,
                          (void *)tiles); /* [n_out, n] */
}

/* The pair of gate and up, remembered for the model's life (the op's userdata); NULL when either
 * cannot be prepared or no memory is left. */
static const geglu_pair *pair_of(const pie_model *m, const struct ggml_tensor *gate, const struct ggml_tensor *up) {
    pie_q8_store *s = m->q8;
    for (int32_t i = 0; i < s->n_pairs; i++)
        if (s->pairs[i].gate == gate && s->pairs[i].up == up) return &s->pairs[i];
    const uint8_t *gate_tiles = prepared_tiles(m, gate), *up_tiles = gate_tiles ? prepared_tiles(m, up) : NULL;
    if (!up_tiles) return NULL;
    if (s->n_pairs == s->cap_pairs) { /* pairs are never moved once handed out: sized once, one per layer */
        if (s->cap_pairs) return NULL;
        s->pairs = calloc((size_t)m->hp.n_layer, sizeof(*s->pairs));
        if (!s->pairs) return NULL;
        s->cap_pairs = m->hp.n_layer;
    }
    s->pairs[s->n_pairs] = (geglu_pair){ .gate = gate, .up = up, .gate_tiles = gate_tiles, .up_tiles = up_tiles, .gelu = s->gelu };
    return &s->pairs[s->n_pairs++];
}

struct ggml_tensor *pie_q8_geglu(pie_graph *g, struct ggml_tensor *gate, struct ggml_tensor *up, struct ggml_tensor *x) {
    const pie_model *m = g->model;
    if (!takes(m, gate, x) || !takes(m, up, x) || gate->type != up->type || !ggml_are_same_shape(gate, up)) return NULL;
    const geglu_pair *p = pair_of(m, gate, up);
    if (!p) return NULL;
    struct ggml_tensor *args[3] = { gate, up, columns(g, gate, x) };
    return ggml_custom_4d(g->ctx, GGML_TYPE_F32, gate->ne[1], x->ne[1], 1, 1, args, 3, multiply_geglu, GGML_N_TASKS_MAX,
                          (void *)p); /* [n_ff, n] */
}

#else

struct ggml_tensor *pie_q8_matmul(pie_graph *g, struct ggml_tensor *w, struct ggml_tensor *x) {
    (void)g; (void)w; (void)x;
    return NULL;
}

struct ggml_tensor *pie_q8_geglu(pie_graph *g, struct ggml_tensor *gate, struct ggml_tensor *up, struct ggml_tensor *x) {
    (void)g; (void)gate; (void)up; (void)x;
    return NULL;
}

#endif
