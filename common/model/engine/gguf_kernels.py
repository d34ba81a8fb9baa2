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

The per-block d and m stay fp16 as in the file (converted with F16C as they are read).
It is compiled once per machine with the system C compiler (`cc`, `-O3 -mavx2 -mfma -mf16c -fopenmp`)
into the dvi cache directory and loaded with ctypes; `available()` is False (and the engine
uses torch's kernels) where there is no compiler, no AVX2/FMA, or the build fails.
"""

from __future__ import annotations

import ctypes
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
"""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


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

    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"gguf_blocks_{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "gguf_blocks.c", Path(tmp) / "gguf_blocks.so"
            src.write_text(_SOURCE)
            done = subprocess.run([compiler, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("building the GGUF block kernel failed: %s", done.stderr.strip()[-500:])
                return None
            out.replace(target)  # atomic: a concurrent build never leaves half a library
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.q4_1_mm.argtypes = [p, i, i, p, p, p, i, p, i]
    lib.q8_0_mm.argtypes = [p, i, i, p, p, i, p, i]
    lib.q4_1_mm.restype = lib.q8_0_mm.restype = None
    return lib


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

    def bytes_read(self) -> int:
        """Bytes one call streams: the quants plus the fp32 scales (and offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        if rows > MAX_ROWS:
            return torch.cat([self(x[i:i + MAX_ROWS]) for i in range(0, rows, MAX_ROWS)])
        y = torch.empty(rows, self.out_features)
        threads = torch.get_num_threads()
        if self.kind == "Q4_1":
            self._lib.q4_1_mm(x.data_ptr(), rows, self.in_features, self.qs.data_ptr(), self.d.data_ptr(),
                              self.m.data_ptr(), self.out_features, y.data_ptr(), threads)
        else:
            self._lib.q8_0_mm(x.data_ptr(), rows, self.in_features, self.qs.data_ptr(), self.d.data_ptr(),
                              self.out_features, y.data_ptr(), threads)
        return y
