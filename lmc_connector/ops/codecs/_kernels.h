/* Shared by the codecs' C kernels: per-ISA clones of the hot loops (SIMD), and float
 * conversions that round exactly as torch converts. */
#ifndef LMC_KERNELS_H
#define LMC_KERNELS_H

#include <stdint.h>
#include <string.h>

/* One clone per instruction set, picked at load time (glibc ifunc); -DLMC_PLAIN builds one. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(LMC_PLAIN)
#define SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIMD
#endif

static inline uint32_t bits_of(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

static inline float float_of(uint32_t u)
{
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Round to nearest even, as torch converts (finite input). */
static inline uint16_t to_bf16(float v)
{
    const uint32_t u = bits_of(v);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* IEEE half, round to nearest even, as torch converts; branch-free so that it vectorizes
 * (no F16C needed). Below 2**-14 the sum with 0.5f rounds the magnitude to the subnormal
 * grid; from 65520 up it is infinity (NaN stays NaN). */
static inline uint16_t to_f16(float v)
{
    const uint32_t u = bits_of(v);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    const uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
    const uint32_t big = 0x7C00u | (uint32_t)(a > 0x7F800000u) << 9;
    const uint32_t is_sub = -(uint32_t)(a < 0x38800000u);
    const uint32_t is_big = -(uint32_t)(a >= 0x47800000u);
    const uint32_t h = (subnormal & is_sub) | (normal & ~is_sub);
    return (uint16_t)(sign | (big & is_big) | (h & ~is_big));
}

#endif
