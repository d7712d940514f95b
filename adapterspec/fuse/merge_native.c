/* The inner loops of merge_numpy's merges, compiled by merge_native.py with the system's C compiler.
 *
 * Every value is computed with the operations, in the order and with the roundings of mlx's CPU path:
 * the rank-r sum term by term (the reference BLAS behind mlx's matmul), no fused multiply-adds
 * (compiled with -ffp-contract=off), float16 roundings through F16C or _Float16 conversions and
 * bfloat16 roundings on the bits, as mlx rounds (to nearest even), mx.dequantize's and mx.quantize's
 * arithmetic. fuse.merge checks the bits against mlx at run time before any of it is used.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

typedef _Float16 half;

/* float16 <-> float32 for whole rows: eight at a time with x86's F16C instructions, else one by one. */
static void half_to_float(const uint16_t *in, float *out, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
#endif
    for (; i < n; i++) out[i] = (float)((const half *)in)[i];
}

static void float_to_half(const float *in, uint16_t *out, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) ((half *)out)[i] = (half)in[i];
}

/* x rounded to float16's precision and range, in place (subnormals and overflow to ±inf included). */
static void round_half(float *x, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; i < n; i++) x[i] = (float)(half)x[i];
}

enum { FLOAT32 = 0, FLOAT16 = 1, BFLOAT16 = 2 };

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* mlx's float -> bfloat16: round to nearest even on the bits, any NaN to 0x7FC0. */
static inline uint16_t bfloat16_of(float f) {
    const uint32_t u = bits_of(f);
    return isnan(f) ? (uint16_t)0x7FC0 : (uint16_t)((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
}

/* A row of `dtype` values widened to float32, and back (rounding to nearest even); x rounded in place. */
static void to_float(const void *in, float *out, int n, int dtype) {
    if (dtype == FLOAT16)
        half_to_float(in, out, n);
    else if (dtype == BFLOAT16)
        for (int i = 0; i < n; i++) out[i] = float_of((uint32_t)((const uint16_t *)in)[i] << 16);
    else
        memcpy(out, in, sizeof(float) * (size_t)n);
}

static void from_float(const float *in, void *out, int n, int dtype) {
    if (dtype == FLOAT16)
        float_to_half(in, out, n);
    else if (dtype == BFLOAT16)
        for (int i = 0; i < n; i++) ((uint16_t *)out)[i] = bfloat16_of(in[i]);
    else
        memcpy(out, in, sizeof(float) * (size_t)n);
}

static void round_to(float *x, int n, int dtype) {
    if (dtype == FLOAT16)
        round_half(x, n);
    else if (dtype == BFLOAT16)
        for (int i = 0; i < n; i++) x[i] = float_of((uint32_t)bfloat16_of(x[i]) << 16);
}

static inline float load(const void *p, size_t i, int dtype) {
    float v;
    to_float((const char *)p + i * (dtype == FLOAT32 ? 4 : 2), &v, 1, dtype);
    return v;
}

static inline void store(void *p, size_t i, float v, int dtype) {
    from_float(&v, (char *)p + i * (dtype == FLOAT32 ? 4 : 2), 1, dtype);
}

/* acc[c] = scale * (b[0]*a_t[0][c] + b[1]*a_t[1][c] + ...), summed term after term. */
static void low_rank_row(float *acc, const float *a_t, const float *b, int rank, int cols, float scale) {
    const float b0 = b[0];
    for (int c = 0; c < cols; c++) acc[c] = b0 * a_t[c];
    for (int k = 1; k < rank; k++) {
        const float *a = a_t + (size_t)k * cols;
        const float bk = b[k];
        for (int c = 0; c < cols; c++) acc[c] = acc[c] + bk * a[c];
    }
    for (int c = 0; c < cols; c++) acc[c] = acc[c] * scale;
}

/* out = W + scale·(A·B)ᵀ rounded once to W's dtype; W (rows, cols), a_t (rank, cols), b_t (rows, rank). */
int merge_dense(const void *w, void *out, int dtype, const float *a_t, const float *b_t, int rows, int cols, int rank,
                float scale) {
    const size_t item = dtype == FLOAT32 ? 4 : 2;
    float *acc = malloc(sizeof(float) * (size_t)cols), *wide = malloc(sizeof(float) * (size_t)cols);
    int status = 0;
    if (!acc || !wide) {
        status = 2;
        goto done;
    }
    for (int r = 0; r < rows; r++) {
        low_rank_row(acc, a_t, b_t + (size_t)r * rank, rank, cols, scale);
        to_float((const char *)w + (size_t)r * cols * item, wide, cols, dtype);
        for (int c = 0; c < cols; c++) acc[c] = acc[c] + wide[c];
        from_float(acc, (char *)out + (size_t)r * cols * item, cols, dtype);
    }
done:
    free(acc);
    free(wide);
    return status;
}

/* codes[c] = the c-th code of a row of packed words, as a float (BITS a compile-time constant). */
#define UNPACK(BITS)                                                                   \
    static void unpack_##BITS(const uint32_t *words, float *codes, int cols) {       \
        for (int j = 0; j < cols / (32 / BITS); j++) {                                \
            const uint32_t word = words[j];                                           \
            for (int k = 0; k < 32 / BITS; k++)                                       \
                codes[j * (32 / BITS) + k] = (float)((word >> (k * BITS)) & ((1u << BITS) - 1u)); \
        }                                                                             \
    }
UNPACK(2)
UNPACK(4)
UNPACK(8)

/* words = the codes (floats holding integers 0 .. 2^BITS - 1) packed, the first in the lowest bits. */
#define PACK(BITS)                                                                     \
    static void pack_##BITS(const float *codes, uint32_t *words, int cols) {         \
        for (int j = 0; j < cols / (32 / BITS); j++) {                                \
            uint32_t word = 0;                                                        \
            for (int k = 0; k < 32 / BITS; k++)                                       \
                word |= (uint32_t)codes[j * (32 / BITS) + k] << (k * BITS);           \
            words[j] = word;                                                          \
        }                                                                             \
    }
PACK(2)
PACK(4)
PACK(8)

/* Q(deq(W) + scale·(A·B)ᵀ) for W stored as mlx's affine quantization with `bits` (2, 4 or 8) and
 * `group_size`; scales and biases (rows, cols/group_size) of `dtype` (FLOAT32, FLOAT16, BFLOAT16). With
 * `requantize` the outputs are out_packed, out_scales, out_biases like the inputs (with `grid`, each group
 * that fits the input's grid is rounded on it, the others requantized as mx.quantize does); without it,
 * out_dense (rows, cols) in the scales' dtype. Returns 1 for a merged value that is not finite
 * (requantize only: merge_numpy leaves those to mlx), 2 when out of memory, 3 for unsupported bits,
 * 0 otherwise. */
int merge_affine(const uint32_t *packed, const void *scales, const void *biases, int dtype, const float *a_t,
                 const float *b_t, int rows, int cols, int rank, float scale, int bits, int group_size, int requantize,
                 int grid, uint32_t *out_packed, void *out_scales, void *out_biases, void *out_dense) {
    const int groups = cols / group_size, words = cols / (32 / bits);
    const float n_bins = (float)((1 << bits) - 1), eps = 1e-7f;
    if (bits != 2 && bits != 4 && bits != 8) return 3;
    float *acc = malloc(sizeof(float) * (size_t)cols), *w = malloc(sizeof(float) * (size_t)cols);
    float *codes = malloc(sizeof(float) * (size_t)group_size), *base_codes = malloc(sizeof(float) * (size_t)cols);
    int status = 0;
    if (!acc || !w || !codes || !base_codes) {
        status = 2;
        goto done;
    }
    for (int r = 0; r < rows; r++) {
        const uint32_t *pr = packed + (size_t)r * words;
        if (bits == 2) unpack_2(pr, base_codes, cols);
        else if (bits == 4) unpack_4(pr, base_codes, cols);
        else unpack_8(pr, base_codes, cols);
        memcpy(w, base_codes, sizeof(float) * (size_t)cols);
        for (int g = 0; g < groups; g++) {
            const float s = load(scales, (size_t)r * groups + g, dtype), b = load(biases, (size_t)r * groups + g, dtype);
            float *wg = w + (size_t)g * group_size;
            /* mx.dequantize computes in the scales' dtype: s·q rounds before the bias is added. */
            for (int j = 0; j < group_size; j++) wg[j] = s * wg[j];
            round_to(wg, group_size, dtype);
            for (int j = 0; j < group_size; j++) wg[j] = wg[j] + b;
        }
        round_to(w, cols, dtype);
        low_rank_row(acc, a_t, b_t + (size_t)r * rank, rank, cols, scale);
        for (int c = 0; c < cols; c++) acc[c] = acc[c] + w[c];
        round_to(acc, cols, dtype);
        if (!requantize) {
            from_float(acc, (char *)out_dense + (size_t)r * cols * (dtype == FLOAT32 ? 4 : 2), cols, dtype);
            continue;
        }
        for (int g = 0; g < groups; g++) {
            float *v = acc + (size_t)g * group_size;
            float w_min = INFINITY, w_max = -INFINITY;
            int finite = 1;
            for (int j = 0; j < group_size; j++) {
                finite &= isfinite(v[j]) != 0;
                w_max = v[j] > w_max ? v[j] : w_max;
                w_min = v[j] < w_min ? v[j] : w_min;
            }
            if (!finite) {
                status = 1;
                goto done;
            }
            if (grid) {
                /* On the base's own grid where every element fits it: the nearest code under the input's scale and
                 * bias, which are kept bit for bit; an element the adapter does not move keeps its own code (at
                 * 8 bits a bfloat16 value can round far enough that dividing back gives its neighbour's). */
                const size_t at = (size_t)r * groups + g;
                const float s = load(scales, at, dtype), b = load(biases, at, dtype);
                const float *unmoved = w + (size_t)g * group_size, *own = base_codes + (size_t)g * group_size;
                int fits = 1;
                for (int j = 0; j < group_size && fits; j++) {
                    codes[j] = v[j] == unmoved[j] ? own[j] : rintf((v[j] - b) / s);
                    fits = codes[j] >= 0.0f && codes[j] <= n_bins;
                }
                if (fits) {
                    memcpy(v, codes, sizeof(float) * (size_t)group_size);
                    store(out_scales, at, s, dtype);
                    store(out_biases, at, b, dtype);
                    continue;
                }
            }
            /* mx.quantize's parameters, in its float arithmetic. */
            const int edge_is_min = fabsf(w_min) > fabsf(w_max);
            float step = (w_max - w_min) / n_bins;
            step = step < eps ? eps : step;
            step = edge_is_min ? step : -step;
            const float edge = edge_is_min ? w_min : w_max;
            const float q0 = rintf(edge / step);
            float bias = 0.0f;
            if (q0 != 0.0f) {
                step = edge / q0;
                bias = edge;
            }
            for (int j = 0; j < group_size; j++) {
                float q = rintf((v[j] - bias) / step);
                q = q < 0.0f ? 0.0f : q;
                v[j] = n_bins < q ? n_bins : q;
            }
            store(out_scales, (size_t)r * groups + g, step, dtype);
            store(out_biases, (size_t)r * groups + g, bias, dtype);
        }
        uint32_t *po = out_packed + (size_t)r * words;
        if (bits == 2) pack_2(acc, po, cols);
        else if (bits == 4) pack_4(acc, po, cols);
        else pack_8(acc, po, cols);
    }
done:
    free(acc);
    free(w);
    free(codes);
    free(base_codes);
    return status;
}
