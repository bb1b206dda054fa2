/* Fused attention for the torch twin's inference on x86 CPUs: softmax(q k^T * scale + mask) v,
 * one (row, head) at a time, its T x T scores kept in a per-thread buffer that stays in the
 * L2 cache instead of going out to memory. Built by nanobert/torch_cpu.py on first use
 * (cc -O3 -march=native -fopenmp, against PyPI's oneDNN) and cached, as mlx_cpu.py builds
 * its BLAS shims.
 *
 * Why: torch's SDPA on a CPU (its flash attention) runs the two products of each block of
 * queries as small MKL GEMMs with a head size of 32 and reached ~115 GFLOP/s on an AMD Zen 4,
 * where oneDNN's GEMM runs the same products for a whole head at ~205 (docs/cpu-speed.md).
 *
 * Layout: q, k, v are (B, T, H) row-major with row stride ld (the Linears' outputs, heads
 * side by side: head h is columns h*D .. h*D+D-1), so no transpose is ever copied; out is
 * (B, T, H) contiguous, as the output Linear reads it. mask: NULL or (B, T) additive, over keys.
 * Per (b, h): S = scale q k^T (oneDNN), S += mask, e = exp(S - rowmax), out = (e v) / rowsum
 * (the division on T x D values, not T x T). exp: the polynomial of nanobert/mlx_cpu.py's
 * _exp (x = k ln2 + r, degree 5 on |r| <= ln2/2, 2^k built in the exponent bits), here on
 * 16 floats at a time with GCC's vector extensions, which -march=native lowers to AVX-512
 * or AVX2. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
               const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
enum { W = 16 }; /* floats per vector */

static const float LOG2E = 1.4426950408889634f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
static const float ROUND = 12582912.0f; /* 1.5 * 2^23: (y + ROUND) - ROUND rounds y to an integer */
static const float C0 = 1.0000000716868866f, C1 = 0.999999691849954f, C2 = 0.49998894517838344f,
                   C3 = 0.1666757500916874f, C4 = 0.04191541965190584f, C5 = 0.008297649365701593f;

static inline f16 vmax(f16 a, f16 b) {
    i16 a_wins = a > b; /* -1 where a > b, else 0 */
    return (f16)(((i16)a & a_wins) | ((i16)b & ~a_wins));
}

/* exp(x) for x <= 0 (scores minus their row's max); below -88 it is 0, as for masked keys */
static inline f16 vexp(f16 x) {
    x = vmax(x, (f16){} - 88.0f);
    f16 k = (x * LOG2E + ROUND) - ROUND;
    f16 r = (x - k * LN2_HI) - k * LN2_LO;
    f16 p = C0 + r * (C1 + r * (C2 + r * (C3 + r * (C4 + r * C5))));
    i16 bits = (__builtin_convertvector(k, i16) + 127) << 23; /* 2^k */
    return p * (f16)bits;
}

static inline float sexp(float x) { /* the same for one float (a row's tail) */
    f16 v = {x};
    return vexp(v)[0];
}

static void softmax_row(float *s, const float *mask, int T, float *sum_out) {
    /* s = exp(s + mask - max) in place, *sum_out = their sum */
    int j = 0, Tv = T / W * W;
    float m = -INFINITY;
    if (mask)
        for (j = 0; j < T; j++) s[j] += mask[j];
    f16 mv = (f16){} - INFINITY;
    for (j = 0; j < Tv; j += W)
        mv = vmax(mv, *(f16 *)(s + j));
    for (int l = 0; l < W; l++)
        m = mv[l] > m ? mv[l] : m;
    for (j = Tv; j < T; j++)
        m = s[j] > m ? s[j] : m;
    f16 sv = {};
    for (j = 0; j < Tv; j += W) {
        f16 e = vexp(*(f16 *)(s + j) - m);
        *(f16 *)(s + j) = e;
        sv += e;
    }
    float sum = 0.0f;
    for (int l = 0; l < W; l++)
        sum += sv[l];
    for (j = Tv; j < T; j++)
        sum += s[j] = sexp(s[j] - m);
    *sum_out = sum;
}

/* Returns 0, or -1 if a scratch buffer could not be allocated. */
int nanobert_attention(const float *q, const float *k, const float *v, int64_t ld, const float *mask, float *out,
                       int B, int heads, int T, int D, float scale, int threads) {
    int failed = 0;
    int64_t stride = (T + W - 1) / W * W; /* score rows 64-byte aligned, for the vector loads */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        size_t floats = (size_t)T * stride + stride; /* the scores, then the rows' sums */
        float *S = aligned_alloc(64, floats * sizeof(float)), *sums = S + (size_t)T * stride;
#pragma omp for schedule(static)
        for (int task = 0; task < B * heads; task++) {
            if (!S) {
                failed = 1;
                continue;
            }
            int b = task / heads, h = task % heads;
            size_t offset = (size_t)b * T * ld + (size_t)h * D;
            float *o = out + (size_t)b * T * heads * D + (size_t)h * D;
            const float *row_mask = mask ? mask + (size_t)b * T : NULL;
            dnnl_sgemm('N', 'T', T, T, D, scale, q + offset, ld, k + offset, ld, 0.0f, S, stride);
            for (int i = 0; i < T; i++)
                softmax_row(S + i * stride, row_mask, T, sums + i);
            dnnl_sgemm('N', 'N', T, D, T, 1.0f, S, stride, v + offset, ld, 0.0f, o, (int64_t)heads * D);
            for (int i = 0; i < T; i++) {
                float inv = 1.0f / sums[i];
                for (int d = 0; d < D; d++)
                    o[(size_t)i * heads * D + d] *= inv;
            }
        }
        free(S);
    }
    return failed ? -1 : 0;
}
