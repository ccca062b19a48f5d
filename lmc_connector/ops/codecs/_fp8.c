/* fp8's dequantizer as plain C for the CPU, bit for bit the torch ops of fp8.py.
 *
 * Each e4m3 byte's value (times 2**-8, as fp8.py's bit trick reads it) comes from a table of
 * 256 floats the caller built with those torch ops, so that no float here is ever subnormal;
 * one product per element with its row's multiplier, rounded once to the output's dtype
 * (float32 or bfloat16; the torch ops write float16 as fast, in place).
 */
#include <stdint.h>

#include "_kernels.h"

/* out[r][c] = value[q[r][c]] * mult[r] for rows x channels, written as kind (0 float32,
 * 1 bfloat16). Returns nonzero for a kind it cannot write. */
SIMD int64_t lmc_fp8_dequant(const uint8_t *restrict q, const float *restrict value,
                             const float *restrict mult, int64_t rows, int64_t channels,
                             int64_t kind, void *restrict out)
{
    if (kind < 0 || kind > 1)
        return 1;
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *restrict src = q + r * channels;
        const float m = mult[r];
        if (kind == 0) {
            float *restrict dst = (float *)out + r * channels;
            for (int64_t c = 0; c < channels; ++c)
                dst[c] = value[src[c]] * m;
        } else {
            uint16_t *restrict dst = (uint16_t *)out + r * channels;
            for (int64_t c = 0; c < channels; ++c)
                dst[c] = to_bf16(value[src[c]] * m);
        }
    }
    return 0;
}
