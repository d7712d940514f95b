/* The inner loops of fuse_numpy's merges, compiled by fuse_native.py with the system's C compiler.
 *
 * Every value is computed with the operations, in the order and with the roundings of mlx's CPU path:
 * the rank-r sum term by term (the reference BLAS behind mlx's matmul), no fused multiply-adds
 * (compiled with -ffp-contract=off), float16 roundings through _Float16 conversions (round to
 * nearest even), mx.dequantize's and mx.quantize's arithmetic. fuse_numpy checks the bits against
 * mlx at run time before any of it is used.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* out = W + scale·(A·B)ᵀ rounded once, W float16 (rows, cols); a_t (rank, cols), b_t (rows, rank). */
int merge_dense_f16(const uint16_t *w, uint16_t *out, const float *a_t, const float *b_t, int rows, int cols,
                    int rank, float scale) {
    float *acc = malloc(sizeof(float) * (size_t)cols), *wide = malloc(sizeof(float) * (size_t)cols);
    int status = 0;
    if (!acc || !wide) {
        status = 2;
        goto done;
    }
    for (int r = 0; r < rows; r++) {
        low_rank_row(acc, a_t, b_t + (size_t)r * rank, rank, cols, scale);
        half_to_float(w + (size_t)r * cols, wide, cols);
        for (int c = 0; c < cols; c++) acc[c] = acc[c] + wide[c];
        float_to_half(acc, out + (size_t)r * cols, cols);
    }
done:
    free(acc);
    free(wide);
    return status;
}

/* The same for a float32 W. */
int merge_dense_f32(const float *w, float *out, const float *a_t, const float *b_t, int rows, int cols, int rank,
                    float scale) {
    float *acc = malloc(sizeof(float) * (size_t)cols);
    if (!acc) return 2;
    for (int r = 0; r < rows; r++) {
        low_rank_row(acc, a_t, b_t + (size_t)r * rank, rank, cols, scale);
        const float *wr = w + (size_t)r * cols;
        float *o = out + (size_t)r * cols;
        for (int c = 0; c < cols; c++) o[c] = acc[c] + wr[c];
    }
    free(acc);
    return 0;
}

static inline float load(const void *p, size_t i, int is_half) {
    return is_half ? (float)((const half *)p)[i] : ((const float *)p)[i];
}

static inline void store(void *p, size_t i, float v, int is_half) {
    if (is_half)
        ((half *)p)[i] = (half)v;
    else
        ((float *)p)[i] = v;
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
 * `group_size`; scales and biases (rows, cols/group_size) float16 (is_half) or float32. With
 * `requantize` the outputs are out_packed, out_scales, out_biases like the inputs; without it,
 * out_dense (rows, cols) in the scales' dtype. Returns 1 for a merged value that is not finite
 * (requantize only: fuse_numpy leaves those to mlx), 2 when out of memory, 3 for unsupported bits,
 * 0 otherwise. */
int merge_affine(const uint32_t *packed, const void *scales, const void *biases, int is_half, const float *a_t,
                 const float *b_t, int rows, int cols, int rank, float scale, int bits, int group_size, int requantize,
                 uint32_t *out_packed, void *out_scales, void *out_biases, void *out_dense) {
    const int groups = cols / group_size, words = cols / (32 / bits);
    const float n_bins = (float)((1 << bits) - 1), eps = 1e-7f;
    if (bits != 2 && bits != 4 && bits != 8) return 3;
    float *acc = malloc(sizeof(float) * (size_t)cols), *w = malloc(sizeof(float) * (size_t)cols);
    int status = 0;
    if (!acc || !w) {
        status = 2;
        goto done;
    }
    for (int r = 0; r < rows; r++) {
        const uint32_t *pr = packed + (size_t)r * words;
        if (bits == 2) unpack_2(pr, w, cols);
        else if (bits == 4) unpack_4(pr, w, cols);
        else unpack_8(pr, w, cols);
        for (int g = 0; g < groups; g++) {
            const float s = load(scales, (size_t)r * groups + g, is_half), b = load(biases, (size_t)r * groups + g, is_half);
            float *wg = w + (size_t)g * group_size;
            /* mx.dequantize computes in the scales' dtype: s·q rounds before the bias is added. */
            for (int j = 0; j < group_size; j++) wg[j] = s * wg[j];
            if (is_half) round_half(wg, group_size);
            for (int j = 0; j < group_size; j++) wg[j] = wg[j] + b;
        }
        if (is_half) round_half(w, cols);
        low_rank_row(acc, a_t, b_t + (size_t)r * rank, rank, cols, scale);
        for (int c = 0; c < cols; c++) acc[c] = acc[c] + w[c];
        if (is_half) round_half(acc, cols);
        if (!requantize) {
            if (is_half)
                float_to_half(acc, (uint16_t *)out_dense + (size_t)r * cols, cols);
            else
                for (int c = 0; c < cols; c++) ((float *)out_dense)[(size_t)r * cols + c] = acc[c];
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
            store(out_scales, (size_t)r * groups + g, step, is_half);
            store(out_biases, (size_t)r * groups + g, bias, is_half);
        }
        uint32_t *po = out_packed + (size_t)r * words;
        if (bits == 2) pack_2(acc, po, cols);
        else if (bits == 4) pack_4(acc, po, cols);
        else pack_8(acc, po, cols);
    }
done:
    free(acc);
    free(w);
    return status;
}
