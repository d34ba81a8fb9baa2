"""A small C kernel (AVX2 + FMA) that multiplies fp32 activations by GGUF Q4_1 / Q8_0 blocks.

Why it exists: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) is vectorised for
AVX-512 only; on an AVX2 CPU (the AMD EPYC this was measured on) it runs a scalar loop, 5-60x
slower than streaming the dequantised fp32 matrix (benchmarks/cost_breakdown.py logs the probe).
This kernel reads the blocks as the file stores them (0.625 bytes per Q4_1 weight, 1.0625 per
Q8_0) and computes in fp32:

  y[t, n] = sum over blocks g of  d[n,g] * sum_j q[n,g,j] x[t, 32g + j]  +  m[n,g] * sum_j x[t, 32g + j]

which is x @ W^T for W = d * q + m exactly (d * q is exact in fp32), summed in another order than
a GEMM. Each row's sum is computed by the same instructions whatever the number of rows T, so a
row's result does not depend on the block it is in (one-row steps and verify blocks agree bit for
bit). The activations of a block's rows are read while its weights are in registers, so T rows
cost far less than T one-row calls.

The `q8` path (`GgufBlocks.q8`) is llama.cpp's answer to the fp32 FMA cost of several rows:
each call quantises its rows once to Q8 blocks (int8 q, d = max|x| / 127, and d * sum(q) for
Q4_1's offset), takes exact integer dot products with the blocks (`vpdpbusd` with AVX512-VNNI or
AVX-VNNI, `maddubs` + `madd` with AVX2, Q4_1's pair sums added in int16 before one `madd`;
chosen from the CPU flags at compile time: the same integer sums, the same bits) and sums the
per-block results in fp32 in a fixed order. Weights stay
exact; activations are rounded to 8 bits of their block's range (the bound is in `q8`).

`causal_attention` is the attention of one-row steps and verify blocks, computed per (head, row)
in an order fixed by the row's position, so a block's rows equal the one-row steps bit for bit.
The query heads that share a kv head (grouped-query attention: SmolLM2's 9 over 3) run together,
sharing each key and value row's loads, each with the arithmetic it would do alone.

The per-block d and m stay fp16 as in the file (converted with F16C as they are read).
It is compiled once per machine with the system C compiler (`cc`, `-O3 -mavx2 -mfma -mf16c -fopenmp`
plus the VNNI flags this CPU has)
into the dvi cache directory and loaded with ctypes; `available()` is False (and the engine
uses torch's kernels) where there is no compiler, no AVX2/FMA, or the build fails.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 16
"""Most rows one call takes (a verify block); more are split into calls of at most this many."""

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#define MAXT 16

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* acc[t][i] += w_i * x[t, 32g + 8i : 32g + 8i + 8] for every row t: one block of 32 weights. */
static inline void fma_block(int T, int K, int g, const float *x, __m256 w0, __m256 w1, __m256 w2, __m256 w3,
                             __m256 acc[][4]) {
    for (int t = 0; t < T; t++) {
        const float *xp = x + t * K + 32 * g;
        acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc[t][1]);
        acc[t][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), acc[t][2]);
        acc[t][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), acc[t][3]);
    }
}

/* y[t, n] = the sum of acc[t] + extra[t] for every row t. */
static inline void store_rows(int T, int N, int n, __m256 acc[][4], const float *extra, float *y) {
    for (int t = 0; t < T; t++) {
        __m256 s = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3]));
        y[(size_t)t * N + n] = hsum(s) + extra[t];
    }
}

/* x [T, K] fp32, qs [N, G, 16] nibbles (GGUF Q4_1 order), d, m [N, G] fp16 bits, y [T, N]. */
void q4_1_mm(const float *x, int T, int K, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
             int N, float *y, int threads) {
    const int G = K / 32;
    float *xs = (float *)malloc(sizeof(float) * T * G);
    for (int t = 0; t < T; t++)
        for (int g = 0; g < G; g++) {
            __m256 s = _mm256_loadu_ps(x + t * K + 32 * g);
            s = _mm256_add_ps(s, _mm256_loadu_ps(x + t * K + 32 * g + 8));
            s = _mm256_add_ps(s, _mm256_loadu_ps(x + t * K + 32 * g + 16));
            s = _mm256_add_ps(s, _mm256_loadu_ps(x + t * K + 32 * g + 24));
            xs[t * G + g] = hsum(s);
        }
    const __m128i mask = _mm_set1_epi8(0x0F);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        __m256 acc[MAXT][4];
        float macc[MAXT];
        for (int t = 0; t < T; t++) {
            acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = _mm256_setzero_ps();
            macc[t] = 0.0f;
        }
        const uint8_t *row = qs + (size_t)n * G * 16;
        for (int g = 0; g < G; g++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(row + 16 * g));
            __m128i lo = _mm_and_si128(b, mask);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            __m256 dv = _mm256_set1_ps(_cvtsh_ss(d[(size_t)n * G + g]));
            __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv);
            __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv);
            __m256 w2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv);
            __m256 w3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv);
            float mg = _cvtsh_ss(m[(size_t)n * G + g]);
            fma_block(T, K, g, x, w0, w1, w2, w3, acc);
            for (int t = 0; t < T; t++)
                macc[t] += mg * xs[t * G + g];
        }
        store_rows(T, N, n, acc, macc, y);
    }
    free(xs);
}

/* x [T, K] fp32, qs [N, K] int8 (GGUF Q8_0 values), d [N, G] fp16 bits, y [T, N]. */
void q8_0_mm(const float *x, int T, int K, const int8_t *qs, const uint16_t *d, int N, float *y, int threads) {
    const int G = K / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        __m256 acc[MAXT][4];
        for (int t = 0; t < T; t++)
            acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = _mm256_setzero_ps();
        const int8_t *row = qs + (size_t)n * K;
        for (int g = 0; g < G; g++) {
            __m256i b = _mm256_loadu_si256((const __m256i *)(row + 32 * g));
            __m128i b0 = _mm256_castsi256_si128(b), b1 = _mm256_extracti128_si256(b, 1);
            __m256 dv = _mm256_set1_ps(_cvtsh_ss(d[(size_t)n * G + g]));
            __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0)), dv);
            __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8))), dv);
            __m256 w2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1)), dv);
            __m256 w3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8))), dv);
            fma_block(T, K, g, x, w0, w1, w2, w3, acc);
        }
        static const float zeros[MAXT] = {0};
        store_rows(T, N, n, acc, zeros, y);
    }
}

/* ---- integer path: activations quantised per row to Q8 blocks, int8 x int4/int8 dot products ---- */
/* Weights are repacked into panels of 16 output columns (GgufBlocks.q8 builds them): for panel
   p and 32-block g, the bytes hold the block's 32 values of all 16 columns so that one 32-bit
   lane of a register is 4 consecutive values of one column. One integer dot product against 4
   activation bytes broadcast to every lane then advances all the columns at once, and after 8
   such steps each lane holds its column's exact block sum: the float work per (row, block) is a
   convert, a multiply and a fused add for 16 columns, not per column (llama.cpp's repacked
   layouts use the same idea). Q4_1 panels: 4 chunks of 64 bytes per block, chunk j's low
   nibbles the values 4j..4j+3 of each column, its high nibbles 4j+16..4j+19. Q8_0 panels: 8
   chunks, chunk j the values 4j..4j+3 stored as q + 128 (unsigned). The 512-bit build takes a
   chunk in one register; the 256-bit builds take its two halves (columns 0-7, 8-15) in turn. */
#if defined(DVI_AVX512VNNI)
#define DOT_ACC(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define DOT_Q8_0(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define Q8_0_OFFSET 1
#elif defined(DVI_AVXVNNI)
#define DOT_ACC(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#define DOT_Q8_0(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#define Q8_0_OFFSET 1
#else
/* u8 x s8 pairs summed to int16 (no saturation: u <= 15 or |u| <= 128 against |s| <= 127), then
   pairs to int32. Q8_0's q + 128 would overflow the int16 pairs, so its sign moves onto x. */
#define DOT_ACC(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
static inline __m256i dot_q8_0_avx2(__m256i acc, __m256i u, __m256i s) {
    const __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));  /* q + 128 -> q */
    return DOT_ACC(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(s, q));
}
#define DOT_Q8_0(acc, u, s) dot_q8_0_avx2((acc), (u), (s))
#define Q8_0_OFFSET 0
#endif
#define Q8_ROWS 8
#define PANEL 16
#define PREFETCH_AHEAD 16  /* blocks: the hardware prefetcher alone left a one-row step ~10% slower */

/* Each 32-value block of each row: d = max|x| / 127, q = round(x * 127 / max|x|) in [-127, 127]
   (the scale from an exact division, the rounding to nearest even of the vector unit), qsum the
   exact sum of q, and sx = d * qsum (Q4_1's offset term; llama.cpp's Q8_1 `s`). The offset term
   must see the same quantised x as the nibble term: Q4_1's d * q and m cancel to w = d * q + m,
   and only then is the error bounded by |w| (with the exact sum of x it is bounded by |d * q|,
   which is up to ~2x |w| and was 5x the error on SmolLM2's q_proj). Rows are independent. */
static void quantize_rows(const float *x, int T, int K, int8_t *xq, float *dx, float *sx, int32_t *qsum) {
    const int G = K / 32;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int r = 0; r < T * G; r++) {
        const float *p = x + (size_t)r * 32;
        __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
        __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        dx[r] = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + (size_t)r * 32), packed);
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        qsum[r] = _mm_cvtsi128_si32(s4);
        sx[r] = (float)qsum[r] * dx[r];  /* exact integer (|qsum| < 2^24) times d */
    }
}

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

/* One panel (16 columns p * 16 .. p * 16 + 15) for rows t < T (a compile-time constant where
   inlined): y[t, n] = acc + off, where acc sums over blocks g, in order, fma(isum * dx[t, g],
   dw[n, g]) and off (Q4_1 only) sums fma(m[n, g], sx[t, g]); isum is the exact integer block dot
   product. Each column's lane runs the same operations in the 512-bit build (one register per
   panel) and in the 256-bit ones (two halves), so every build gives the same bits; and the same
   instructions run for a row whatever T is, so a row's result does not depend on T (nor on the
   thread count: one thread computes a panel). */
#if defined(DVI_AVX512VNNI)
static inline __attribute__((always_inline)) void q8_panel(
        const int T, const int is_q4, int K, int N, int p, const uint8_t *w, const uint16_t *d,
        const uint16_t *m, const int8_t *xq, const float *dx, const float *sx, const int32_t *qsum, float *y) {
    const int G = K / 32, chunks = is_q4 ? 4 : 8;
    __m512 acc[Q8_ROWS], off[Q8_ROWS];
    for (int t = 0; t < T; t++) acc[t] = off[t] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const uint8_t *wp = w + (size_t)p * G * chunks * 64;
    const uint16_t *dp = d + (size_t)p * G * PANEL, *mp = is_q4 ? m + (size_t)p * G * PANEL : NULL;
    for (int g = 0; g < G; g++) {
        __m512i wv[8];
        const uint8_t *b = wp + (size_t)g * chunks * 64;
        for (int c = 0; c < chunks; c++)  /* the block PREFETCH_AHEAD ahead (the next panel's, near the end) */
            _mm_prefetch((const char *)(b + PREFETCH_AHEAD * chunks * 64 + 64 * c), _MM_HINT_T0);
        if (is_q4) {
            for (int j = 0; j < 4; j++) {
                __m512i raw = _mm512_loadu_si512((const void *)(b + 64 * j));
                wv[j] = _mm512_and_si512(raw, nib);
                wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
            }
        } else {
            for (int j = 0; j < 8; j++) wv[j] = _mm512_loadu_si512((const void *)(b + 64 * j));
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dp + (size_t)g * PANEL)));
        const __m512 mw = is_q4 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mp + (size_t)g * PANEL)))
                                : _mm512_setzero_ps();
        for (int t = 0; t < T; t++) {
            const int8_t *xp = xq + (size_t)t * K + 32 * g;
            __m512i ia = _mm512_setzero_si512(), ib = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {  /* chunk j: values 4j.. (wv[j]) and 4j + 16.. (wv[j + 4]) */
                ia = _mm512_dpbusd_epi32(ia, wv[j], _mm512_set1_epi32(load4(xp + 4 * j)));
                ib = _mm512_dpbusd_epi32(ib, wv[j + 4], _mm512_set1_epi32(load4(xp + 16 + 4 * j)));
            }
            __m512i isum = _mm512_add_epi32(ia, ib);
            if (!is_q4)  /* the weights were q + 128: take 128 * sum(x) back off */
                isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * qsum[(size_t)t * G + g]));
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dx[(size_t)t * G + g]));
            acc[t] = _mm512_fmadd_ps(v, dw, acc[t]);
            if (is_q4) off[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx[(size_t)t * G + g]), off[t]);
        }
    }
    for (int t = 0; t < T; t++)
        _mm512_storeu_ps(y + (size_t)t * N + (size_t)p * PANEL, is_q4 ? _mm512_add_ps(acc[t], off[t]) : acc[t]);
}
#else
static inline __attribute__((always_inline)) void q8_panel(
        const int T, const int is_q4, int K, int N, int p, const uint8_t *w, const uint16_t *d,
        const uint16_t *m, const int8_t *xq, const float *dx, const float *sx, const int32_t *qsum, float *y) {
    const int G = K / 32, chunks = is_q4 ? 4 : 8;
    __m256 acc[Q8_ROWS][2], off[Q8_ROWS][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = off[t][0] = off[t][1] = _mm256_setzero_ps();
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const uint8_t *wp = w + (size_t)p * G * chunks * 64;
    const uint16_t *dp = d + (size_t)p * G * PANEL, *mp = is_q4 ? m + (size_t)p * G * PANEL : NULL;
    for (int g = 0; g < G; g++) {
        for (int h = 0; h < 2; h++) {  /* columns 8h .. 8h + 7 of the panel: bytes 32h .. of each chunk */
            __m256i wv[8];
            const uint8_t *b = wp + (size_t)g * chunks * 64 + 32 * h;
            if (h == 0)
                for (int c = 0; c < chunks; c++)
                    _mm_prefetch((const char *)(b + PREFETCH_AHEAD * chunks * 64 + 64 * c), _MM_HINT_T0);
            if (is_q4) {
                for (int j = 0; j < 4; j++) {
                    __m256i raw = _mm256_loadu_si256((const __m256i *)(b + 64 * j));
                    wv[j] = _mm256_and_si256(raw, nib);
                    wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
                }
            } else {
                for (int j = 0; j < 8; j++) wv[j] = _mm256_loadu_si256((const __m256i *)(b + 64 * j));
            }
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dp + (size_t)g * PANEL + 8 * h)));
            const __m256 mw = is_q4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mp + (size_t)g * PANEL + 8 * h)))
                                    : _mm256_setzero_ps();
            for (int t = 0; t < T; t++) {
                const int8_t *xp = xq + (size_t)t * K + 32 * g;
                __m256i isum;
#if !defined(DVI_AVXVNNI)
                if (is_q4) {
                    /* AVX2 without VNNI: a u8 x s8 pair sum is at most 2 * 15 * 127 = 3,810 in
                       magnitude, so the 8 chunks' pair sums add up exactly in int16 (30,480 <
                       2^15) and one madd widens them: the same integer sum as 8 DOT_ACCs in 16
                       integer instructions per row instead of 25 (a verify row's cost here is
                       this integer work): about 5% less time per Q4_1 matrix on an AMD EPYC,
                       same bits (benchmarks/kernel_ab.py). */
                    __m256i s16 = _mm256_maddubs_epi16(wv[0], _mm256_set1_epi32(load4(xp)));
                    for (int j = 1; j < 8; j++) {
                        const int at = j < 4 ? 4 * j : 16 + 4 * (j - 4);
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[j], _mm256_set1_epi32(load4(xp + at))));
                    }
                    isum = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
                } else
#endif
                {
                    __m256i ia = _mm256_setzero_si256(), ib = _mm256_setzero_si256();
                    for (int j = 0; j < 4; j++) {
                        if (is_q4) {
                            ia = DOT_ACC(ia, wv[j], _mm256_set1_epi32(load4(xp + 4 * j)));
                            ib = DOT_ACC(ib, wv[j + 4], _mm256_set1_epi32(load4(xp + 16 + 4 * j)));
                        } else {
                            ia = DOT_Q8_0(ia, wv[j], _mm256_set1_epi32(load4(xp + 4 * j)));
                            ib = DOT_Q8_0(ib, wv[j + 4], _mm256_set1_epi32(load4(xp + 16 + 4 * j)));
                        }
                    }
                    isum = _mm256_add_epi32(ia, ib);
                }
                if (!is_q4 && Q8_0_OFFSET)
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(128 * qsum[(size_t)t * G + g]));
                const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(dx[(size_t)t * G + g]));
                acc[t][h] = _mm256_fmadd_ps(v, dw, acc[t][h]);
                if (is_q4) off[t][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx[(size_t)t * G + g]), off[t][h]);
            }
        }
    }
    for (int t = 0; t < T; t++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(y + (size_t)t * N + (size_t)p * PANEL + 8 * h,
                             is_q4 ? _mm256_add_ps(acc[t][h], off[t][h]) : acc[t][h]);
}
#endif

#define DISPATCH_ROWS(rows, CALL)                                                                 \
    switch (rows) {                                                                               \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; \
    }

/* x [T, K] fp32 -> y [T, N] (N a multiple of 8), x quantised per row to Q8 blocks; w, d, m the
   panels (above). Every y[t, n] is computed by one thread, the same way whatever T and the
   thread count. */
static void q8_mm(const float *x, int T, int K, const uint8_t *w, const uint16_t *d, const uint16_t *m,
                  int N, float *y, int threads, const int is_q4) {
    const int G = K / 32, P = N / PANEL;
    int8_t *xq = (int8_t *)malloc((size_t)T * K + 64);
    float *dx = (float *)malloc(sizeof(float) * T * G), *sx = (float *)malloc(sizeof(float) * T * G);
    int32_t *qsum = (int32_t *)malloc(sizeof(int32_t) * T * G);
    quantize_rows(x, T, K, xq, dx, sx, qsum);
    for (int t0 = 0; t0 < T; t0 += Q8_ROWS) {
        const int rows = T - t0 < Q8_ROWS ? T - t0 : Q8_ROWS;
        const int8_t *cq = xq + (size_t)t0 * K;
        const float *cd = dx + (size_t)t0 * G, *cs = sx + (size_t)t0 * G;
        const int32_t *cz = qsum + (size_t)t0 * G;
        float *cy = y + (size_t)t0 * N;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int p = 0; p < P; p++) {
            if (is_q4) {
#define Q4_CALL(R) q8_panel(R, 1, K, N, p, w, d, m, cq, cd, cs, cz, cy)
                DISPATCH_ROWS(rows, Q4_CALL)
            } else {
#define Q8_CALL(R) q8_panel(R, 0, K, N, p, w, d, m, cq, cd, cs, cz, cy)
                DISPATCH_ROWS(rows, Q8_CALL)
            }
        }
    }
    free(xq); free(dx); free(sx); free(qsum);
}

/* Q4_1 panels: w [P, G, 4, 64] nibbles, d, m [P, G, 16] fp16 bits. */
void q4_1_q8_mm(const float *x, int T, int K, const uint8_t *w, const uint16_t *d, const uint16_t *m,
                int N, float *y, int threads) {
    q8_mm(x, T, K, w, d, m, N, y, threads, 1);
}

/* Q8_0 panels: w [P, G, 8, 64] (q + 128), d [P, G, 16] fp16 bits. */
void q8_0_q8_mm(const float *x, int T, int K, const uint8_t *w, const uint16_t *d, int N, float *y, int threads) {
    q8_mm(x, T, K, w, d, NULL, N, y, threads, 0);
}

/* ---- causal attention, one (head, row) at a time: a row's result depends only on its position ---- */
/* exp(x) for x <= 0 (scores minus their max): 2^n * (1 + r + r^2 P(r)), r = x - n ln 2 (Cephes'
   expf polynomial, ~1 ulp); 0 below -87 (and for -inf). */
static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* The 8 horizontal sums of a[0..7], as one vector. */
static inline __m256 hsum8x8(const __m256 *a) {
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

static inline __m256 dot_row(const float *q, const float *k, int hd) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    for (int d = 8; d < hd; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    return acc;
}

/* out_i[hd] = softmax(scale * q_i . k_j, j < n) @ v for the nq (1..3) query heads i that read
   one kv head: keys/values rows j at k + j * hd, s_i scratch of n rounded up to 8 floats. Each
   head's every step is the one it would take alone, in an order that depends on n and hd only
   (the 8 keys of a chunk as 8 interleaved dot products, the exponentials, then the values in key
   order); the heads only share the loads of each key and value row, which the attention of
   grouped heads spends most of its time on. */
static inline __attribute__((always_inline)) void attend_rows(
        const int nq, const float *const *q, const float *k, const float *v, int n, int hd, float scale,
        float *const *s, float *const *out) {
    const int n8 = (n + 7) & ~7;
    int j = 0;
    for (; j + 8 <= n; j += 8) {  /* dot_row of 8 keys, their chains interleaved (the same operations) */
        const float *kj = k + (size_t)j * hd;
        __m256 a[3][8];
        {
            __m256 q0[3];
            for (int i = 0; i < nq; i++) q0[i] = _mm256_loadu_ps(q[i]);
            for (int u = 0; u < 8; u++) {
                const __m256 kv = _mm256_loadu_ps(kj + (size_t)u * hd);
                for (int i = 0; i < nq; i++) a[i][u] = _mm256_mul_ps(q0[i], kv);
            }
        }
        for (int d = 8; d < hd; d += 8) {
            __m256 qd[3];
            for (int i = 0; i < nq; i++) qd[i] = _mm256_loadu_ps(q[i] + d);
            for (int u = 0; u < 8; u++) {
                const __m256 kv = _mm256_loadu_ps(kj + (size_t)u * hd + d);
                for (int i = 0; i < nq; i++) a[i][u] = _mm256_fmadd_ps(qd[i], kv, a[i][u]);
            }
        }
        for (int i = 0; i < nq; i++) _mm256_storeu_ps(s[i] + j, _mm256_mul_ps(hsum8x8(a[i]), _mm256_set1_ps(scale)));
    }
    for (int i = 0; i < nq; i++) {
        for (int r = j; r < n; r++) s[i][r] = hsum(dot_row(q[i], k + (size_t)r * hd, hd)) * scale;
        for (int r = n; r < n8; r++) s[i][r] = -INFINITY;
    }
    float inv[3];
    for (int i = 0; i < nq; i++) {
        __m256 m8 = _mm256_set1_ps(-INFINITY);  /* the maximum is exact in any order; the padding is -inf */
        for (int r = 0; r < n8; r += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s[i] + r));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        __m256 total = _mm256_setzero_ps();
        for (int r = 0; r < n8; r += 8) {
            __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s[i] + r), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(s[i] + r, p);
            total = _mm256_add_ps(total, p);
        }
        inv[i] = 1.0f / hsum(total);
    }
    for (int d0 = 0; d0 < hd; d0 += 64) {  /* 8 accumulators of 8 values per head at a time */
        const int width = hd - d0 < 64 ? (hd - d0) / 8 : 8;
        __m256 acc[3][8];
        for (int i = 0; i < nq; i++)
            for (int d = 0; d < width; d++) acc[i][d] = _mm256_setzero_ps();
        for (int r = 0; r < n; r++) {
            const float *vr = v + (size_t)r * hd + d0;
            __m256 p[3];
            for (int i = 0; i < nq; i++) p[i] = _mm256_set1_ps(s[i][r]);
            for (int d = 0; d < width; d++) {
                const __m256 vv = _mm256_loadu_ps(vr + 8 * d);
                for (int i = 0; i < nq; i++) acc[i][d] = _mm256_fmadd_ps(p[i], vv, acc[i][d]);
            }
        }
        for (int i = 0; i < nq; i++)
            for (int d = 0; d < width; d++)
                _mm256_storeu_ps(out[i] + d0 + 8 * d, _mm256_mul_ps(acc[i][d], _mm256_set1_ps(inv[i])));
    }
}

/* q [H, T, hd] contiguous (rows at positions past .. past + T - 1); k, v: KVH heads of past + T
   rows of hd floats each (row stride hd, head stride `head_stride`); out [T, H * hd]. Row t
   attends to positions 0 .. past + t; query head h reads kv head h / (H / KVH). hd % 8 == 0,
   hd <= 256. The query heads of one kv head and one row are computed together by one thread, up
   to 3 at a time, each exactly as it would be alone (`attend_rows`). */
void causal_attention(const float *q, int H, int T, int hd, const float *k, const float *v, int KVH,
                      long head_stride, int past, float scale, float *out, int threads) {
    const int group = H / KVH, n8 = (past + T + 7) & ~7;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)H * T * n8);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int kt = 0; kt < KVH * T; kt++) {
        const int kv = kt / T, t = kt % T;
        for (int h0 = 0; h0 < group; h0 += 3) {
            const int nq = group - h0 < 3 ? group - h0 : 3;
            const float *qs[3];
            float *ss[3], *os[3];
            for (int i = 0; i < nq; i++) {
                const int h = kv * group + h0 + i;
                qs[i] = q + ((size_t)h * T + t) * hd;
                ss[i] = scratch + ((size_t)h * T + t) * n8;
                os[i] = out + (size_t)t * H * hd + (size_t)h * hd;
            }
            const float *kh = k + (size_t)kv * head_stride, *vh = v + (size_t)kv * head_stride;
            if (nq == 3) attend_rows(3, qs, kh, vh, past + t + 1, hd, scale, ss, os);
            else if (nq == 2) attend_rows(2, qs, kh, vh, past + t + 1, hd, scale, ss, os);
            else attend_rows(1, qs, kh, vh, past + t + 1, hd, scale, ss, os);
        }
    }
    free(scratch);
}

/* ---- the rest of a decoder layer: RMSNorm, rotary embedding + KV append, SiLU gating ---- */
/* Every row is computed alone, by the same instructions whatever the number of rows. */

static inline float sum_squares(const float *x, int n) {
    __m256 a = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        a = _mm256_fmadd_ps(v, v, a);
    }
    float s = hsum(a);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

/* out[t] = w * (x[t] * (1 / sqrt(mean(x[t]^2) + eps))) for x [T, H] (HF LlamaRMSNorm's order). */
void rms_norm_rows(const float *x, int T, int H, const float *w, float eps, float *out) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * H;
        float *o = out + (size_t)t * H;
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(sum_squares(xr, H) / (float)H + eps));
        int i = 0;
        for (; i + 8 <= H; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), r)));
        const float rs = _mm256_cvtss_f32(r);
        for (; i < H; i++) o[i] = w[i] * (xr[i] * rs);
    }
}

/* sum = x + delta, out = rms_norm_rows(sum), all [T, H]: a residual add and the next norm. */
void add_rms_norm_rows(const float *x, const float *delta, int T, int H, const float *w, float eps,
                       float *sum, float *out) {
    int n = T * H, i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(sum + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(delta + i)));
    for (; i < n; i++) sum[i] = x[i] + delta[i];
    rms_norm_rows(sum, T, H, w, eps, out);
}

/* out [T, I] = silu(gu[:, :I]) * gu[:, I:] for gu [T, 2I]; silu(g) = g / (1 + exp(-g)), with
   exp taken of -|g| only (e = exp(-|g|): g / (1 + e) for g >= 0, g e / (1 + e) below). */
void silu_mul_rows(const float *gu, int T, int I, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int t = 0; t < T; t++) {
        const float *g = gu + (size_t)t * 2 * I, *u = g + I;
        float *o = out + (size_t)t * I;
        for (int i = 0; i < I; i += 8) {  /* I % 8 == 0 (checked by the caller) */
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 e = exp_nonpositive(_mm256_or_ps(gv, sign));  /* exp(-|g|) */
            __m256 num = _mm256_blendv_ps(gv, _mm256_mul_ps(gv, e), gv);  /* sign bit set: g < 0 */
            __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
    }
}

/* HF's rotate_half form: out = x * cos + cat(-x2, x1) * sin, per head of hd values. */
static inline void rotate_head(const float *x, const float *cos, const float *sin, int hd, float *out) {
    const int half = hd / 2;
    for (int d = 0; d < half; d++) {
        out[d] = x[d] * cos[d] + (-x[d + half]) * sin[d];
        out[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half];
    }
}

/* qkv [T, (H + 2 KVH) hd]: the fused projection's rows at positions past .. past + T - 1;
   cos, sin [T, hd]. Rotates q into q_out [H, T, hd], and k, writing k and v into the cache
   buffers k, v (KVH heads, head stride `head_stride`, row stride hd) at rows past .. past + T - 1. */
void rope_append(const float *qkv, int T, int H, int KVH, int hd, const float *cos, const float *sin,
                 float *k, float *v, long head_stride, int past, float *q_out) {
    const int width = (H + 2 * KVH) * hd;
    for (int t = 0; t < T; t++) {
        const float *row = qkv + (size_t)t * width, *c = cos + (size_t)t * hd, *s = sin + (size_t)t * hd;
        for (int h = 0; h < H; h++)
            rotate_head(row + (size_t)h * hd, c, s, hd, q_out + ((size_t)h * T + t) * hd);
        for (int h = 0; h < KVH; h++) {
            const size_t at = (size_t)h * head_stride + (size_t)(past + t) * hd;
            rotate_head(row + (size_t)(H + h) * hd, c, s, hd, k + at);
            __builtin_memcpy(v + at, row + (size_t)(H + KVH + h) * hd, sizeof(float) * hd);
        }
    }
}

/* One new row for each of B sequences: row b of qkv [B, (H + 2 KVH) hd] (cos, sin [B, hd]) sits at
   position past[b] of sequence b, whose cache buffers are k[b], v[b] (head stride head_stride[b]).
   Per row, exactly the calls a one-row step makes (rope_append, then causal_attention with T = 1),
   so each row equals that step bit for bit; out [B, H hd]. */
void sequence_rows_attention(const float *qkv, int B, int H, int KVH, int hd, const float *cos, const float *sin,
                             float *const *k, float *const *v, const long *head_stride, const int *past,
                             float scale, float *out, int threads) {
    const int width = (H + 2 * KVH) * hd;
    float *q = (float *)malloc(sizeof(float) * (size_t)H * hd);
    for (int b = 0; b < B; b++) {
        rope_append(qkv + (size_t)b * width, 1, H, KVH, hd, cos + (size_t)b * hd, sin + (size_t)b * hd,
                    k[b], v[b], head_stride[b], past[b], q);
        causal_attention(q, H, 1, hd, k[b], v[b], KVH, head_stride[b], past[b], scale, out + (size_t)b * H * hd, threads);
    }
    free(q);
}

"""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
"""-ffp-contract=off: the compiler may not fuse a C `a * b + c` into an FMA in one row-count
specialisation and not in another (that would make a row's result depend on its block)."""
_DOT_FLAGS = {
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DDVI_AVX512VNNI"],
    "avxvnni": ["-mavxvnni", "-DDVI_AVXVNNI"],
    "avx2": [],
}
"""The int8 dot-product instructions of the q8 path, by CPU: `vpdpbusd` (AVX512-VNNI on 512-bit
registers, or AVX-VNNI on 256-bit ones) or AVX2's `maddubs` + `madd`. All three give the same exact integer sums,
so the q8 path's results do not depend on which one this CPU runs."""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


def dot_instructions() -> str:
    """`avx512vnni`, `avxvnni` or `avx2`: the int8 dot product the q8 path compiles for here."""
    flags = _cpu_flags()
    if {"avx512_vnni", "avx512vl", "avx512bw"} <= flags:
        return "avx512vnni"
    return "avxvnni" if "avx_vnni" in flags else "avx2"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel library (built once into the dvi cache), or None where it cannot be."""
    if os.environ.get("DVI_GGUF_KERNELS", "1") == "0" or not _cpu_has_avx2_fma():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: the GGUF block kernel is unavailable")
        return None
    from common.model.loading import cache_dir

    target = None
    for dot in dict.fromkeys([dot_instructions(), "avx2"]):  # an old compiler may lack the VNNI flags
        target = _build(compiler, [*_FLAGS, *_DOT_FLAGS[dot]], cache_dir() / "kernels")
        if target is not None:
            break
    return None if target is None else _load(target)


def _load(target: Path) -> ctypes.CDLL:
    """The compiled library at `target` with its functions' argument types declared."""
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.q4_1_mm.argtypes = lib.q4_1_q8_mm.argtypes = [p, i, i, p, p, p, i, p, i]
    lib.q8_0_mm.argtypes = lib.q8_0_q8_mm.argtypes = [p, i, i, p, p, i, p, i]
    lib.q4_1_mm.restype = lib.q8_0_mm.restype = lib.q4_1_q8_mm.restype = lib.q8_0_q8_mm.restype = None
    lib.causal_attention.argtypes = [p, i, i, i, p, p, i, ctypes.c_long, i, ctypes.c_float, p, i]
    lib.causal_attention.restype = None
    lib.rms_norm_rows.argtypes = [p, i, i, p, ctypes.c_float, p]
    lib.add_rms_norm_rows.argtypes = [p, p, i, i, p, ctypes.c_float, p, p]
    lib.silu_mul_rows.argtypes = [p, i, i, p]
    lib.rms_norm_rows.restype = lib.add_rms_norm_rows.restype = lib.silu_mul_rows.restype = None
    lib.rope_append.argtypes = [p, i, i, i, i, p, p, p, p, ctypes.c_long, i, p]
    lib.rope_append.restype = None
    lib.sequence_rows_attention.argtypes = [p, i, i, i, i, p, p, p, p, p, p, ctypes.c_float, p, i]
    lib.sequence_rows_attention.restype = None
    return lib


def _build(compiler: str, flags: list[str], folder: Path, source: str = _SOURCE) -> Path | None:
    """The kernel library compiled from `source` (this module's, or another revision's for an A/B)
    with `flags` into `folder` (reused when already there), or None."""
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    target = folder / f"gguf_blocks_{digest}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / "gguf_blocks.c", Path(tmp) / "gguf_blocks.so"
        src.write_text(source)
        done = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("building the GGUF block kernel (%s) failed: %s", " ".join(flags), done.stderr.strip()[-500:])
            return None
        out.replace(target)  # atomic: a concurrent build never leaves half a library
    return target


def available() -> bool:
    return _library() is not None


def blocks_or_none(weight) -> "GgufBlocks | None":
    """`GgufBlocks(weight)`, or None where the kernel is unavailable or the matrix is not in a form
    it reads exactly (scales that are not fp16 values, a GGUF type it has no kernel for)."""
    if not available():
        return None
    try:
        return GgufBlocks(weight)
    except ValueError as exc:
        log.info("GGUF block kernel skipped for a %s matrix: %s", weight.kind, exc)
        return None


def _fp16_exact(values: torch.Tensor) -> torch.Tensor:
    """The fp16 form of scales that came from the file's fp16 fields (ValueError if one does not fit)."""
    half = values.half().contiguous()
    if not torch.equal(half.float(), values):
        raise ValueError("GGUF block scales must be exact fp16 values")
    return half


class GgufBlocks:
    """One matrix [N, K] in the layout the kernel reads, built from an `AffineInt4` of kind Q4_1
    (one part: scale d, offset m) or Q8_0 (two parts: high and low nibbles of q + 128).

    __call__(x [T, K] fp32 contiguous CPU) -> [T, N] fp32."""

    def __init__(self, weight):
        lib = _library()
        assert lib is not None, "GgufBlocks needs the compiled kernel (gguf_kernels.available())"
        self._lib = lib
        self.out_features, self.in_features = weight.shape
        n, k = weight.shape
        groups = k // 32
        if weight.kind == "Q4_1":
            (part,) = weight.parts
            q = part.q.reshape(n, groups, 32)
            self.qs = (q[..., :16] | (q[..., 16:] << 4)).contiguous()  # [N, G, 16] GGUF's nibble order
            self.d, self.m = _fp16_exact(part.scale), _fp16_exact(part.offset)
        elif weight.kind == "Q8_0":
            high, low = weight.parts
            self.qs = (high.q.to(torch.int16) * 16 + low.q.to(torch.int16) - 128).to(torch.int8).contiguous()
            self.d, self.m = _fp16_exact(low.scale), None
        else:
            raise ValueError(f"no GGUF block kernel for {weight.kind}")
        self.kind = weight.kind
        self.panels = _panels(weight)

    def bytes_read(self) -> int:
        """Bytes one call streams: the quants plus the fp32 scales (and offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] fp32 -> x @ W^T [T, N] fp32, fp32 activations (the `gguf` kernel)."""
        return self._run(x, integer=False)

    def q8(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] fp32 -> [T, N] fp32 with x quantised per row to Q8 blocks (the `q8` kernel).

        Each 32-value block of a row becomes int8 q (|q| <= 127) times d = max|x| / 127; the
        weights stay exact, the block dot products are exact integers, and the per-block results
        are summed in fp32 in a fixed order. Error: |y - x @ W^T| <= sum over the row's blocks of
        (d / 2) * sum |W| of the block (rounding each x by at most half a step). Every row's result
        is bitwise the same whatever T and the thread count."""
        return self._run(x, integer=True)

    def _run(self, x: torch.Tensor, integer: bool) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        if rows > MAX_ROWS:
            return torch.cat([self._run(x[i:i + MAX_ROWS], integer) for i in range(0, rows, MAX_ROWS)])
        threads = torch.get_num_threads()
        if integer:
            panels = self.panels
            y = torch.empty(rows, panels.columns)
            if self.kind == "Q4_1":
                self._lib.q4_1_q8_mm(x.data_ptr(), rows, self.in_features, panels.w.data_ptr(), panels.d.data_ptr(),
                                     panels.m.data_ptr(), panels.columns, y.data_ptr(), threads)
            else:
                self._lib.q8_0_q8_mm(x.data_ptr(), rows, self.in_features, panels.w.data_ptr(), panels.d.data_ptr(),
                                     panels.columns, y.data_ptr(), threads)
            return y if panels.columns == self.out_features else y[:, :self.out_features].contiguous()
        y = torch.empty(rows, self.out_features)
        if self.kind == "Q4_1":
            self._lib.q4_1_mm(x.data_ptr(), rows, self.in_features, self.qs.data_ptr(), self.d.data_ptr(),
                              self.m.data_ptr(), self.out_features, y.data_ptr(), threads)
        else:
            self._lib.q8_0_mm(x.data_ptr(), rows, self.in_features, self.qs.data_ptr(), self.d.data_ptr(),
                              self.out_features, y.data_ptr(), threads)
        return y


PANEL = 16
"""Output columns per panel of the q8 kernel's weight layout (a 512-bit register of int32 lanes)."""


@dataclasses.dataclass(frozen=True)
class Panels:
    """A matrix [N, K] in the q8 kernel's layout (see the C source): `columns` = N rounded up to a
    multiple of PANEL (zero weights pad it), w [P, G, chunks, 4 * PANEL] uint8 (Q4_1: 4 chunks of nibble
    pairs; Q8_0: 8 chunks of q + 128), d and m [P, G, PANEL] fp16 (m None for Q8_0), where
    P = columns / PANEL and G = K / 32."""

    columns: int
    w: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None


def _panels(weight) -> Panels:
    """The q8 kernel's panel layout of an `AffineInt4` of kind Q4_1 or Q8_0 (see `GgufBlocks`)."""
    n, k = weight.shape
    columns, groups = -(-n // PANEL) * PANEL, k // 32

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(columns - n, *t.shape[1:])]) if columns > n else t

    def by_panel(scale: torch.Tensor) -> torch.Tensor:  # [N, G] -> [P, G, PANEL] fp16
        return padded(_fp16_exact(scale)).reshape(-1, PANEL, groups).permute(0, 2, 1).contiguous()

    if weight.kind == "Q4_1":
        (part,) = weight.parts
        q = padded(part.q.to(torch.uint8)).reshape(-1, PANEL, groups, 2, 4, 4)  # [p, c, g, half, j, b]
        q = q.permute(0, 2, 3, 4, 1, 5)  # [p, g, half, j, c, b]: a lane is 4 values of one column
        w = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, groups, 4, 4 * PANEL).contiguous()
        return Panels(columns, w, by_panel(part.scale), by_panel(part.offset))
    high, low = weight.parts
    q = (high.q.to(torch.int16) * 16 + low.q.to(torch.int16)).to(torch.uint8)  # q + 128
    q = padded(q).reshape(-1, PANEL, groups, 8, 4).permute(0, 2, 3, 1, 4)  # [p, g, j, c, b]
    return Panels(columns, q.reshape(-1, groups, 8, 4 * PANEL).contiguous(), by_panel(low.scale), None)


def attention_runs(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """True when `causal_attention` takes these tensors: the kernel is compiled here, fp32 on CPU,
    head_dim a multiple of 8 up to 256, key/value rows contiguous (the KV cache's layout)."""
    hd = q.shape[-1]
    return (available() and q.dtype == keys.dtype == torch.float32 and q.device.type == "cpu"
            and hd % 8 == 0 and hd <= 256 and keys.stride(2) == 1 and keys.stride(1) == hd)


def sequence_rows_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list, heads: int,
                            scale: float) -> torch.Tensor:
    """Rotary, cache append and attention of one new row per sequence, in one call.

    qkv [B, (heads + 2 kv_heads) hd] fp32 contiguous, row b the fused QKV projection of sequence
    b's next position; cos, sin [B, hd] contiguous; caches: B (keys, values, past) of each
    sequence's layer, as `StaticKVCache.reserve(slot, 1)` returns them (buffers [kv_heads,
    capacity, hd] fp32 with room at row `past`). Returns [B, heads * hd]: row b what
    `rope_append` and `causal_attention` give for that row alone, bit for bit."""
    rows = qkv.shape[0]
    hd = cos.shape[1]
    kv_heads = caches[0][0].shape[0]
    key_ptrs = (ctypes.c_void_p * rows)(*[keys.data_ptr() for keys, _, _ in caches])
    value_ptrs = (ctypes.c_void_p * rows)(*[values.data_ptr() for _, values, _ in caches])
    strides = (ctypes.c_long * rows)(*[keys.stride(0) for keys, _, _ in caches])
    pasts = (ctypes.c_int * rows)(*[past for _, _, past in caches])
    out = torch.empty(rows, heads * hd)
    _library().sequence_rows_attention(qkv.data_ptr(), rows, heads, kv_heads, hd, cos.data_ptr(), sin.data_ptr(),
                                       key_ptrs, value_ptrs, strides, pasts, float(scale), out.data_ptr(),
                                       torch.get_num_threads())
    return out


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention of the last T cached positions, bitwise independent of T.

    q [H, T, hd] fp32: queries of the rows at positions past .. past + T - 1, where past =
    keys.shape[1] - T; keys, values [KVH, past + T, hd] fp32 (H a multiple of KVH: grouped
    heads), rows contiguous with the same strides (`attention_runs`). Returns [T, H * hd] fp32
    (heads side by side, the o projection's input). Row t attends to positions 0 .. past + t.
    Each (head, row) is computed in an order fixed by its position alone (with the other heads of
    its kv head, by one thread), so a verify block's row equals the one-row step at that position
    bit for bit, at any thread count (torch's SDPA sums a block's rows in another order than a
    single row's)."""
    heads, rows, hd = q.shape
    assert keys.shape == values.shape and keys.stride() == values.stride() and heads % keys.shape[0] == 0
    q = q.contiguous()
    out = torch.empty(rows, heads * hd)
    _library().causal_attention(q.data_ptr(), heads, rows, hd, keys.data_ptr(), values.data_ptr(), keys.shape[0],
                                keys.stride(0), keys.shape[1] - rows, float(scale), out.data_ptr(),
                                torch.get_num_threads())
    return out
