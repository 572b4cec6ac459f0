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
#include <math.h>
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
 * the dot-product latency; x stays in L1.
 *
 * Optional software prefetch, `prefetch_bytes` ahead in the weight stream (0: none). Whether it
 * pays depends on the CPU: on the 2-core Zen 4 it cost 10-20% of the read rate, on the 2-core
 * AMX Xeon 1 KB ahead took a 0.5B decode step from 52.6 to 44.2 ms (see default_prefetch_bytes).
 * fastvlm/kernels/__init__.py picks the distance per CPU vendor; FASTVLM_GEMV_PREFETCH overrides. */
static int64_t prefetch_bytes = 0;

void fastvlm_set_prefetch(int64_t bytes) { prefetch_bytes = bytes > 0 ? bytes : 0; }
int64_t fastvlm_get_prefetch(void) { return prefetch_bytes; }

#ifdef __AVX512BF16__
static inline float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t I) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
/* 128 products into the four accumulators */
#define DOT128(i) do { \
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + (i)), (__m512bh)_mm512_loadu_si512(x + (i))); \
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + (i) + 32), (__m512bh)_mm512_loadu_si512(x + (i) + 32)); \
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + (i) + 64), (__m512bh)_mm512_loadu_si512(x + (i) + 64)); \
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + (i) + 96), (__m512bh)_mm512_loadu_si512(x + (i) + 96)); \
    } while (0)
    if (prefetch_bytes) {  /* the same loop with the next lines of this stream requested early */
        const char *p = (const char *)w + prefetch_bytes;
        for (; i + 128 <= I; i += 128) {
            for (int line = 0; line < 256; line += 64) _mm_prefetch(p + 2 * i + line, _MM_HINT_T0);
            DOT128(i);
        }
    }
    for (; i + 128 <= I; i += 128) DOT128(i);
#undef DOT128
    for (; i + 32 <= I; i += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    if (i < I) {
        const __mmask32 m = (__mmask32)((1ull << (I - i)) - 1ull);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w + i),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, x + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

void fastvlm_gemv_bf16(const uint16_t *W, const uint16_t *x, const uint16_t *b, uint16_t *y,
                       int64_t O, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++) {
        float s = dot_bf16(W + o * I, x, I);
        if (b) s += bf16_to_f32(b[o]);
        y[o] = f32_to_bf16(s);
    }
}

/* ---- one Qwen2 decoder layer's decode step (batch 1, one new token), in three calls ----
 * Each reproduces transformers' bf16 arithmetic: every tensor the PyTorch module computes is
 * rounded to bf16 at the same points here (RMSNorm statistics in fp32; rotary products and
 * sums, residual adds, SiLU and its product each rounded once), so the results can differ from
 * the module's only through the RMSNorm's fp32 sum order and SiLU's exp (bit-identical on the
 * Zen 4 this was written on). The time they remove is the ~100 small PyTorch ops per layer
 * around the matrix-vector products. */

static inline float bf(uint16_t h) { return bf16_to_f32(h); }
static inline float rnd(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* 1 / sqrt(mean(x^2) + eps), in fp32 */
static float rms_inv(const uint16_t *x, int64_t H, float eps) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= H; i += 16) {
        __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16));
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float s = _mm512_reduce_add_ps(acc);
    for (; i < H; i++) s += bf(x[i]) * bf(x[i]);
    return 1.0f / sqrtf(s / (float)H + eps);
}

/* out = w * bf16(x * r), as Qwen2RMSNorm */
static void rms_apply(const uint16_t *x, const uint16_t *w, float r, uint16_t *out, int64_t H) {
    for (int64_t i = 0; i < H; i++) out[i] = f32_to_bf16(bf(w[i]) * rnd(bf(x[i]) * r));
}

/* Row r of the matrices W[0], W[1], ... stacked (O[j] rows each), plus its bias where B[j] is set. */
static inline float stacked_row(int64_t r, const uint16_t *const *W, const uint16_t *const *B,
                                const int64_t *O, const uint16_t *x, int64_t I) {
    int j = 0;
    while (r >= O[j]) r -= O[j++];
    float s = dot_bf16(W[j] + r * I, x, I);
    return B[j] ? s + bf(B[j][r]) : s;
}

/* h = RMSNorm(x); qkv = [q_proj(h), k_proj(h), v_proj(h)]; rotary on the q and k heads, in place.
 * cos/sin: [D] bf16 for this position; heads of D (even) values, nq query heads then nkv key heads. */
void fastvlm_qwen2_attn_in_bf16(const uint16_t *x, const uint16_t *norm_w, float eps,
                                const uint16_t *Wq, const uint16_t *bq, const uint16_t *Wk, const uint16_t *bk,
                                const uint16_t *Wv, const uint16_t *bv, const uint16_t *cosv, const uint16_t *sinv,
                                int64_t nq, int64_t nkv, int64_t D, int64_t H, uint16_t *h, uint16_t *qkv,
                                int nthreads) {
    const uint16_t *W[3] = {Wq, Wk, Wv}, *B[3] = {bq, bk, bv};
    const int64_t O[3] = {nq * D, nkv * D, nkv * D};
    const int64_t rows = O[0] + O[1] + O[2], half = D / 2;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp single
        rms_apply(x, norm_w, rms_inv(x, H, eps), h, H);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) qkv[r] = f32_to_bf16(stacked_row(r, W, B, O, h, H));
#pragma omp for schedule(static)
        for (int64_t head = 0; head < nq + nkv; head++) {
            uint16_t *v = qkv + head * D;
            uint16_t tmp[512];
            for (int64_t j = 0; j < D; j++) {  /* q * cos + rotate_half(q) * sin, each product rounded */
                float rot = j < half ? -bf(v[j + half]) : bf(v[j - half]);
                tmp[j] = f32_to_bf16(rnd(bf(v[j]) * bf(cosv[j])) + rnd(rot * bf(sinv[j])));
            }
            memcpy(v, tmp, (size_t)D * sizeof(uint16_t));
        }
    }
}

/* x1 = x + o_proj(attn); h = RMSNorm(x1) */
void fastvlm_qwen2_attn_out_bf16(const uint16_t *x, const uint16_t *attn, const uint16_t *Wo, int64_t A,
                                 const uint16_t *norm_w, float eps, int64_t H, uint16_t *x1, uint16_t *h,
                                 int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < H; o++) x1[o] = f32_to_bf16(bf(x[o]) + rnd(dot_bf16(Wo + o * A, attn, A)));
#pragma omp single
        rms_apply(x1, norm_w, rms_inv(x1, H, eps), h, H);
    }
}

/* out = x1 + down_proj(silu(gate_proj(h)) * up_proj(h)); gu: scratch of 2 * I */
void fastvlm_qwen2_mlp_bf16(const uint16_t *x1, const uint16_t *h, const uint16_t *Wg, const uint16_t *Wu,
                            const uint16_t *Wd, int64_t H, int64_t I, uint16_t *gu, uint16_t *out, int nthreads) {
    const uint16_t *W[2] = {Wg, Wu}, *B[2] = {0, 0};
    const int64_t O[2] = {I, I};
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < 2 * I; r++) gu[r] = f32_to_bf16(stacked_row(r, W, B, O, h, H));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < I; i++) {
            float g = bf(gu[i]);
            gu[i] = f32_to_bf16(rnd(g / (1.0f + expf(-g))) * bf(gu[I + i]));
        }
#pragma omp for schedule(static)
        for (int64_t o = 0; o < H; o++) out[o] = f32_to_bf16(bf(x1[o]) + rnd(dot_bf16(Wd + o * I, gu, I)));
    }
}
#endif

static inline float dot_f32(const float *w, const float *x, int64_t I) {
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
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

void fastvlm_gemv_f32(const float *W, const float *x, const float *b, float *y,
                      int64_t O, int64_t I, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++) {
        float s = dot_f32(W + o * I, x, I);
        y[o] = b ? s + b[o] : s;
    }
}

/* ---- a whole Qwen2 decode step (batch 1, one new token) in one call, bf16 or fp32 ----
 * The same arithmetic as the three bf16 calls above, for every layer in turn, inside one OpenMP
 * region, plus what they leave to PyTorch: the KV cache write, single-query attention, the final
 * RMSNorm and the LM head. Going through the Python layers cost about 6 ms of a 44 ms 0.5B step
 * on the 2-core Xeon (~250 us per layer of small PyTorch ops, cache concatenation and calls).
 * One body serves both dtypes (`b`: bf16): in bf16 every intermediate is rounded where
 * transformers' bf16 modules round it (`rq`), in fp32 nothing is.
 *
 * P: 12 pointers per layer (input norm, Wq, bq, Wk, bk, Wv, bv, Wo, post-attention norm, Wg,
 * Wu, Wd; a missing bias is NULL); eps: the two norms' epsilons per layer.
 * kcache/vcache: [L][nkv][cap][D]; positions 0..n-1 hold the context, this step writes n.
 * Attention rounds as PyTorch's CPU flash kernel does for bf16: q.k in fp32, scaled, softmax in
 * fp32 with the exponentials rounded to bf16 for the product with V, the sum taken unrounded, the
 * output divided once and rounded; in one block with expf, where that kernel takes blocks of keys
 * with online rescaling and an approximate exp (so the two differ by bf16 rounding).
 * logits[V]: the LM head's outputs (in bf16 rounded to bf16), as fp32.
 * buf: scratch of 3H + (2nq + 2nkv)D + 2I elements of the dtype; fbuf: fp32 scratch of nq * cap. */
static inline float getv(const void *p, int64_t i, int b) {
    return b ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void setv(void *p, int64_t i, float v, int b) {
    if (b) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}
static inline float rq(float v, int b) { return b ? bf16_to_f32(f32_to_bf16(v)) : v; }
static inline void *at(const void *p, int64_t i, int b) { return (char *)p + i * (b ? 2 : 4); }
static inline float dot_any(const void *w, const void *x, int64_t I, int b) {
#ifdef __AVX512BF16__
    if (b) return dot_bf16((const uint16_t *)w, (const uint16_t *)x, I);
#else
    (void)b;  /* fastvlm_qwen2_step refuses bf16 on such a build */
#endif
    return dot_f32((const float *)w, (const float *)x, I);
}

/* out = w * round(x * r), r = 1 / sqrt(mean(x^2) + eps) in fp32: Qwen2RMSNorm (in bf16 with the
 * three calls' rms_inv, so that both bf16 paths sum in the same order) */
static void rms_norm_any(const void *x, const void *w, float eps, void *out, int64_t H, int b) {
    float r;
#ifdef __AVX512BF16__
    if (b) {
        r = rms_inv((const uint16_t *)x, H, eps);
    } else
#endif
    {
        const float *xf = (const float *)x;
        float s = 0.0f;
        for (int64_t i = 0; i < H; i++) s += xf[i] * xf[i];
        r = 1.0f / sqrtf(s / (float)H + eps);
    }
    for (int64_t i = 0; i < H; i++) setv(out, i, getv(w, i, b) * rq(getv(x, i, b) * r, b), b);
}

/* Returns 0, or -1 for bf16 on a build without AVX512-BF16 (nothing computed). */
int fastvlm_qwen2_step(int b, const void *emb, const void *const *P, const float *eps, int64_t L,
                       int64_t H, int64_t I, int64_t nq, int64_t nkv, int64_t D,
                       const void *cosv, const void *sinv, float scaling,
                       void *kcache, void *vcache, int64_t cap, int64_t n,
                       const void *norm_w, float norm_eps, const void *Wlm, int64_t V,
                       void *buf, float *fbuf, float *logits, int nthreads) {
#ifndef __AVX512BF16__
    if (b) return -1;
#endif
    void *x = buf, *h = at(x, H, b), *x1 = at(h, H, b), *qkv = at(x1, H, b);
    void *attn = at(qkv, (nq + 2 * nkv) * D, b), *gu = at(attn, nq * D, b);
    const int64_t rows = (nq + 2 * nkv) * D, half = D / 2, G = nq / nkv, T = n + 1, A = nq * D;
    const int64_t O[3] = {nq * D, nkv * D, nkv * D};
    const size_t es = b ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp single
        memcpy(x, emb, (size_t)H * es);
        for (int64_t l = 0; l < L; l++) {
            const void *const *p = P + 12 * l;
            void *kc = at(kcache, l * nkv * cap * D, b), *vc = at(vcache, l * nkv * cap * D, b);
#pragma omp single
            rms_norm_any(x, p[0], eps[2 * l], h, H, b);
            /* q, k and v: the three matrices' rows stacked, each plus its bias where there is one */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                int64_t j = 0, rr = r;
                while (rr >= O[j]) rr -= O[j++];
                float s = dot_any(at(p[1 + 2 * j], rr * H, b), h, H, b);
                if (p[2 + 2 * j]) s += getv(p[2 + 2 * j], rr, b);
                setv(qkv, r, s, b);
            }
            /* rotary on the q and k heads; the new k and v go to the cache at position n */
#pragma omp for schedule(static)
            for (int64_t head = 0; head < nq + 2 * nkv; head++) {
                void *v = at(qkv, head * D, b);
                if (head < nq + nkv) {
                    float tmp[512];
                    for (int64_t j = 0; j < D; j++) {  /* q * cos + rotate_half(q) * sin */
                        const float rot = j < half ? -getv(v, j + half, b) : getv(v, j - half, b);
                        tmp[j] = rq(getv(v, j, b) * getv(cosv, j, b), b) + rq(rot * getv(sinv, j, b), b);
                    }
                    for (int64_t j = 0; j < D; j++) setv(v, j, tmp[j], b);
                    if (head >= nq) memcpy(at(kc, ((head - nq) * cap + n) * D, b), v, (size_t)D * es);
                } else {
                    memcpy(at(vc, ((head - nq - nkv) * cap + n) * D, b), v, (size_t)D * es);
                }
            }
            /* single-query attention, query head hq on KV head hq / G */
#pragma omp for schedule(static)
            for (int64_t hq = 0; hq < nq; hq++) {
                const void *q = at(qkv, hq * D, b), *K = at(kc, (hq / G) * cap * D, b);
                const void *Vv = at(vc, (hq / G) * cap * D, b);
                float *sc = fbuf + hq * cap, m = -INFINITY, sum = 0.0f, acc[512];
                for (int64_t t = 0; t < T; t++) {
                    sc[t] = dot_any(at(K, t * D, b), q, D, b) * scaling;
                    if (sc[t] > m) m = sc[t];
                }
                for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
                for (int64_t t = 0; t < T; t++) {
                    const float e = expf(sc[t] - m), pe = rq(e, b);
                    sum += e;
                    if (b) {
                        const uint16_t *vr = (const uint16_t *)Vv + t * D;
                        for (int64_t d = 0; d < D; d++) acc[d] += pe * bf16_to_f32(vr[d]);
                    } else {
                        const float *vr = (const float *)Vv + t * D;
                        for (int64_t d = 0; d < D; d++) acc[d] += pe * vr[d];
                    }
                }
                for (int64_t d = 0; d < D; d++) setv(attn, hq * D + d, acc[d] / sum, b);
            }
#pragma omp for schedule(static)
            for (int64_t o = 0; o < H; o++)
                setv(x1, o, getv(x, o, b) + rq(dot_any(at(p[7], o * A, b), attn, A, b), b), b);
#pragma omp single
            rms_norm_any(x1, p[8], eps[2 * l + 1], h, H, b);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < 2 * I; r++)
                setv(gu, r, dot_any(r < I ? at(p[9], r * H, b) : at(p[10], (r - I) * H, b), h, H, b), b);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < I; i++) {
                const float g = getv(gu, i, b);
                setv(gu, i, rq(g / (1.0f + expf(-g)), b) * getv(gu, I + i, b), b);
            }
#pragma omp for schedule(static)
            for (int64_t o = 0; o < H; o++)
                setv(x, o, getv(x1, o, b) + rq(dot_any(at(p[11], o * I, b), gu, I, b), b), b);
        }
#pragma omp single
        rms_norm_any(x, norm_w, norm_eps, h, H, b);
#pragma omp for schedule(static)
        for (int64_t v = 0; v < V; v++) logits[v] = rq(dot_any(at(Wlm, v * H, b), h, H, b), b);
    }
    return 0;
}

int fastvlm_has_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}
