/* Matrix-vector products for batch-1 LLM decoding on x86-64 CPUs with AVX-512.
 *
 * y[o] = sum_i W[o, i] * x[i] + b[o], W row-major [O, I] (nn.Linear's layout), one row of x.
 * Decoding reads every weight once per token, so this is a pure memory stream: rows are
 * split over the OpenMP threads, products accumulate in fp32 (bf16 pairs via AVX512-BF16
 * dot products) and each result is rounded once. It exists because the BLAS/oneDNN paths
 * PyTorch takes for M=1 reach about half of this machine's read bandwidth.
 * Built at run time by fastvlm/kernels/__init__.py; every entry point has a PyTorch fallback.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One row at a time, front to back: each thread reads one forward stream of memory, which
 * the hardware prefetchers follow at full speed (walking 4 rows side by side made 4 short
 * streams per block and reached ~60% of it on rows of 896 bf16). Four accumulators hide
 * the dot-product latency; x stays in L1. */

#ifdef __AVX512BF16__
void fastvlm_gemv_bf16(const uint16_t *W, const uint16_t *x, const uint16_t *b, uint16_t *y,
                       int64_t O, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const uint16_t *w = W + o * I;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 128 <= I; i += 128) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + i + 64), (__m512bh)_mm512_loadu_si512(x + i + 64));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + i + 96), (__m512bh)_mm512_loadu_si512(x + i + 96));
        }
        for (; i + 32 <= I; i += 32)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
        if (i < I) {
            const __mmask32 m = (__mmask32)((1ull << (I - i)) - 1ull);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w + i),
                                  (__m512bh)_mm512_maskz_loadu_epi16(m, x + i));
        }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        if (b) s += bf16_to_f32(b[o]);
        y[o] = f32_to_bf16(s);
    }
}
#endif

void fastvlm_gemv_f32(const float *W, const float *x, const float *b, float *y,
                      int64_t O, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const float *w = W + o * I;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 64 <= I; i += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
        }
        for (; i + 16 <= I; i += 16)
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        if (i < I) {
            const __mmask16 m = (__mmask16)((1u << (I - i)) - 1u);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, x + i), a1);
        }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        y[o] = b ? s + b[o] : s;
    }
}

int fastvlm_has_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}
