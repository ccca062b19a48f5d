/* fp8's dequantizer as plain C for the CPU, bit for bit the torch ops of fp8.py.
 *
 * Each e4m3 byte's value (times 2**-8, as fp8.py's bit trick reads it) comes from a table of
 * 256 floats the caller built with those torch ops, so that no float here is ever subnormal;
 * one product per element with its row's multiplier, rounded once to the output's dtype (the
 * table lookups are gathers; the conversion to 16 bits is a second, vectorised pass).
 */
#include <stdint.h>

#include "_kernels.h"

/* Elements per pass: the products of a block stay in L1 for their conversion. */
#define BLOCK 1024

/* out[r][c] = value[q[r][c]] * mult[r] for rows x channels, written as kind (0 float32,
 * 1 bfloat16, 2 float16). Returns nonzero for a kind it cannot write. */
SIMD int64_t lmc_fp8_dequant(const uint8_t *restrict q, const float *restrict value,
                             const float *restrict mult, int64_t rows, int64_t channels,
                             int64_t kind, void *restrict out)
{
    if (kind < 0 || kind > 2)
        return 1;
    float row[BLOCK];
    for (int64_t r = 0; r < rows; ++r) {
        const float m = mult[r];
        for (int64_t c0 = 0; c0 < channels; c0 += BLOCK) {
            const int64_t n = channels - c0 < BLOCK ? channels - c0 : BLOCK;
            const uint8_t *restrict src = q + r * channels + c0;
            const int64_t at = r * channels + c0;
            if (kind == 0) {
                float *restrict dst = (float *)out + at;
                for (int64_t c = 0; c < n; ++c)
                    dst[c] = value[src[c]] * m;
                continue;
            }
            for (int64_t c = 0; c < n; ++c)
                row[c] = value[src[c]] * m;
            uint16_t *restrict dst = (uint16_t *)out + at;
            if (kind == 1)
                for (int64_t c = 0; c < n; ++c)
                    dst[c] = to_bf16(row[c]);
            else
                for (int64_t c = 0; c < n; ++c)
                    dst[c] = to_f16(row[c]);
        }
    }
    return 0;
}
