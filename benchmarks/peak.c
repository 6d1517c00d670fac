/* The machine's limits, measured: memory bandwidth (read), int8 dot-product and float32 FMA throughput.
 *
 *   cc -O2 -march=native -fopenmp peak.c -o peak && OMP_NUM_THREADS=2 ./peak
 *
 * Prints one JSON object. Bandwidth: each thread sums its share of a 2 GiB buffer (what decoding does with
 * the weights). Compute: independent accumulator chains of VPDPBUSD (AVX-512 VNNI / AVX-VNNI) and FMA,
 * long enough that the result is throughput, not latency. Used by bench_limits.py.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double read_bandwidth(void) {
    const size_t n = (size_t)2 << 30;
    uint8_t *buf = aligned_alloc(64, n);
    memset(buf, 1, n);  /* touch every page before timing */
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        uint64_t total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
        for (size_t i = 0; i < n; i += 256) {
            __m256i a = _mm256_load_si256((const __m256i *)(buf + i));
            __m256i b = _mm256_load_si256((const __m256i *)(buf + i + 32));
            __m256i c = _mm256_load_si256((const __m256i *)(buf + i + 64));
            __m256i d = _mm256_load_si256((const __m256i *)(buf + i + 96));
            __m256i e = _mm256_load_si256((const __m256i *)(buf + i + 128));
            __m256i f = _mm256_load_si256((const __m256i *)(buf + i + 160));
            __m256i g = _mm256_load_si256((const __m256i *)(buf + i + 192));
            __m256i h = _mm256_load_si256((const __m256i *)(buf + i + 224));
            __m256i s = _mm256_add_epi8(_mm256_add_epi8(_mm256_add_epi8(a, b), _mm256_add_epi8(c, d)),
                                        _mm256_add_epi8(_mm256_add_epi8(e, f), _mm256_add_epi8(g, h)));
            total += (uint64_t)_mm256_extract_epi64(s, 0);
        }
        double dt = now() - t0;
        if (total == 42) printf(" ");  /* keep the loads */
        if (n / dt > best) best = n / dt;
    }
    free(buf);
    return best;
}

#define CHAINS 12
#define ITERS 20000000

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
/* 256-bit VPDPBUSD issues on more ports than the 512-bit one on some cores: measure both, keep the faster. */
static double int8_ops_ymm(void) {
    double t0 = now();
    int64_t sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        __m256i acc[CHAINS];
        __m256i a = _mm256_set1_epi8(1), b = _mm256_set1_epi8(2);
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_setzero_si256();
        for (long i = 0; i < ITERS; i++) {
            for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_dpbusd_epi32(acc[k], a, b);
            __asm__ volatile("" : "+v"(a));
        }
        for (int k = 0; k < CHAINS; k++) sink += _mm256_extract_epi32(acc[k], 0);
    }
    double dt = now() - t0;
    if (sink == 42) printf(" ");
    return (double)omp_get_max_threads() * ITERS * CHAINS * 32 * 2 / dt;
}

static double int8_ops_zmm(void) {
    double t0 = now();
    int64_t sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        __m512i acc[CHAINS];
        __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_setzero_si512();
        for (long i = 0; i < ITERS; i++) {
            for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_dpbusd_epi32(acc[k], a, b);
            __asm__ volatile("" : "+v"(a));  /* an opaque operand: the loop cannot be folded away */
        }
        for (int k = 0; k < CHAINS; k++) sink += _mm512_reduce_add_epi32(acc[k]);
    }
    double dt = now() - t0;
    if (sink == 42) printf(" ");
    /* one VPDPBUSD: 64 u8 x s8 multiplies and 64 adds */
    return (double)omp_get_max_threads() * ITERS * CHAINS * 64 * 2 / dt;
}

static double f32_flops(void) {
    double t0 = now();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        __m512 acc[CHAINS];
        __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_set1_ps((float)k);
        for (long i = 0; i < ITERS; i++) {
            for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
            __asm__ volatile("" : "+v"(a));
        }
        for (int k = 0; k < CHAINS; k++) sink += _mm512_reduce_add_ps(acc[k]);
    }
    double dt = now() - t0;
    if (sink == 42.0f) printf(" ");
    return (double)omp_get_max_threads() * ITERS * CHAINS * 16 * 2 / dt;
}

#else
static double int8_ops_zmm(void) { return 0; }  /* not measured without AVX-512 VNNI */
static double int8_ops_ymm(void) { return 0; }
static double f32_flops(void) { return 0; }
#endif

int main(void) {
    double bw = read_bandwidth();
    double zmm = int8_ops_zmm(), ymm = int8_ops_ymm();
    double f32 = f32_flops();
    printf("{\"threads\": %d, \"read_bytes_per_s\": %.4g, \"int8_ops_per_s\": %.4g, \"int8_zmm\": %.4g, "
           "\"int8_ymm\": %.4g, \"f32_flops_per_s\": %.4g}\n",
           omp_get_max_threads(), bw, zmm > ymm ? zmm : ymm, zmm, ymm, f32);
    return 0;
}
