/* Variants of fastvlm's bf16 matrix-vector kernel (fastvlm/kernels/cpu_gemv.c, included below) and a
 * plain read of the same bytes, for benchmarks/gemv_variants/run.py. Not part of the package. */
/* the package's kernel itself: variant "a" is exactly what fastvlm ships */
#include "../../fastvlm/kernels/cpu_gemv.c"

#define f2b f32_to_bf16
#define dot dot_bf16

void gv_a(const uint16_t*W,const uint16_t*x,uint16_t*y,int64_t O,int64_t I,int nt){
    fastvlm_gemv_bf16(W, x, 0, y, O, I, nt);
}
/* prefetch DIST bytes ahead in the thread's stream */
void gv_pf(const uint16_t*W,const uint16_t*x,uint16_t*y,int64_t O,int64_t I,int nt,int64_t dist){
#pragma omp parallel for num_threads(nt) schedule(static)
    for(int64_t o=0;o<O;o++){
        const char*p=(const char*)(W+o*I)+dist;
        for(int64_t b=0;b<I*2;b+=64) _mm_prefetch(p+b,_MM_HINT_T0);
        y[o]=f2b(dot(W+o*I,x,I));
    }
}
/* 8 accumulators over a row pair processed as one flat stream of 2 rows */
void gv_2r(const uint16_t*W,const uint16_t*x,uint16_t*y,int64_t O,int64_t I,int nt){
#pragma omp parallel for num_threads(nt) schedule(static)
    for(int64_t o=0;o<O;o+=2){
        if(o+1<O){
            const uint16_t*w0=W+o*I,*w1=w0+I;
            __m512 a0=_mm512_setzero_ps(),a1=_mm512_setzero_ps(),b0=_mm512_setzero_ps(),b1=_mm512_setzero_ps();
            int64_t i=0;
            for(;i+64<=I;i+=64){
                __m512i xv0=_mm512_loadu_si512(x+i), xv1=_mm512_loadu_si512(x+i+32);
                a0=_mm512_dpbf16_ps(a0,(__m512bh)_mm512_loadu_si512(w0+i),(__m512bh)xv0);
                a1=_mm512_dpbf16_ps(a1,(__m512bh)_mm512_loadu_si512(w0+i+32),(__m512bh)xv1);
                b0=_mm512_dpbf16_ps(b0,(__m512bh)_mm512_loadu_si512(w1+i),(__m512bh)xv0);
                b1=_mm512_dpbf16_ps(b1,(__m512bh)_mm512_loadu_si512(w1+i+32),(__m512bh)xv1);
            }
            y[o]=f2b(_mm512_reduce_add_ps(_mm512_add_ps(a0,a1)));
            y[o+1]=f2b(_mm512_reduce_add_ps(_mm512_add_ps(b0,b1)));
        } else y[o]=f2b(dot(W+o*I,x,I));
    }
}
/* pure read: sum of the same bytes as fp32 lanes */
float rd(const uint16_t*W,int64_t n,int nt){
    float tot=0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+:tot)
    for(int64_t c=0;c<nt;c++){
        int64_t per=n/nt; const __m512i*p=(const __m512i*)(W+c*per);
        __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0;
        for(int64_t i=0;i+4<= per*2/64;i+=4){a0=_mm512_xor_si512(a0,_mm512_loadu_si512(p+i));a1=_mm512_xor_si512(a1,_mm512_loadu_si512(p+i+1));a2=_mm512_xor_si512(a2,_mm512_loadu_si512(p+i+2));a3=_mm512_xor_si512(a3,_mm512_loadu_si512(p+i+3));}
        a0=_mm512_xor_si512(_mm512_xor_si512(a0,a1),_mm512_xor_si512(a2,a3));
        tot+=(float)_mm512_reduce_add_epi32(a0);
    }
    return tot;
}
