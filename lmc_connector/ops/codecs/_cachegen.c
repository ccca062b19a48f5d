/* CacheGen's bulk passes as plain C for the CPU, bit for bit the torch ops of cachegen.py.
 *
 * A chunk's rows are its (K/V, layer) blocks, split into `groups` parts of `per` blocks:
 * row r = (b * groups + g) * per + p for chunk b. The coder's symbols lie step-major,
 * [per][tokens][chunks][groups][channels], so that each (part, channel) is one stream.
 *
 * Quantization rounds half to even, as torch.round does, by adding and subtracting 1.5 * 2**23
 * (exact for |v| < 2**22: the caller's scales bound |v| by 15), then clamps to int8. Built with
 * -ffp-contract=off, so no product is fused with a sum: every float result matches torch's.
 */
#include <stdint.h>
#include <string.h>

#include "_kernels.h"

#define ROUNDER 12582912.0f

/* x: float32 [rows][tokens][channels]; factor: [rows][tokens]. Writes q = round(x * factor)
 * [rows][tokens][channels] and, per row and channel, the sums of q and q * q over tokens. */
SIMD void lmc_cg_quantize(const float *restrict x, int64_t rows, int64_t tokens,
                          int64_t channels, const float *restrict factor, int8_t *restrict q,
                          int32_t *restrict s1, int32_t *restrict s2)
{
    for (int64_t r = 0; r < rows; ++r) {
        int32_t *restrict a = s1 + r * channels;
        int32_t *restrict b = s2 + r * channels;
        memset(a, 0, (size_t)channels * sizeof *a);
        memset(b, 0, (size_t)channels * sizeof *b);
        for (int64_t t = 0; t < tokens; ++t) {
            const float f = factor[r * tokens + t];
            const float *restrict xr = x + (r * tokens + t) * channels;
            int8_t *restrict qr = q + (r * tokens + t) * channels;
            for (int64_t c = 0; c < channels; ++c) {
                int32_t i = (int32_t)((xr[c] * f + ROUNDER) - ROUNDER);
                i = i < -127 ? -127 : i;
                i = i > 127 ? 127 : i;
                qr[c] = (int8_t)i;
                a[c] += i;
                b[c] += i * i;
            }
        }
    }
}

/* codes = q + off[row][channel], from q [chunks * groups * per][tokens][channels] into the
 * coder's layout (int16). */
SIMD void lmc_cg_codes(const int8_t *restrict q, const int16_t *restrict off, int64_t nb,
                       int64_t groups, int64_t per, int64_t tokens, int64_t channels,
                       int16_t *restrict out)
{
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t p = 0; p < per; ++p) {
                const int64_t r = (b * groups + g) * per + p;
                const int16_t *restrict o = off + r * channels;
                for (int64_t t = 0; t < tokens; ++t) {
                    const int8_t *restrict src = q + (r * tokens + t) * channels;
                    int16_t *restrict dst = out + (((p * tokens + t) * nb + b) * groups + g) * channels;
                    for (int64_t c = 0; c < channels; ++c)
                        dst[c] = (int16_t)(src[c] + o[c]);
                }
            }
}

/* Chunk b of the decoded symbols syms (the coder's layout, uint8) into out [groups][per]
 * [tokens][channels]: (sym + off[row][channel]) * step[row][tokens], rows of chunk b only
 * (off and step hold that chunk's rows). kind: 0 float32, 1 bfloat16, 2 float16. Returns
 * nonzero for a kind it cannot write. */
SIMD int64_t lmc_cg_dequant(const uint8_t *restrict syms, const float *restrict off,
                            const float *restrict step, int64_t nb, int64_t b, int64_t groups,
                            int64_t per, int64_t tokens, int64_t channels, int64_t kind,
                            void *restrict out)
{
    if (kind < 0 || kind > 2)
        return 1;
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t p = 0; p < per; ++p) {
            const int64_t r = g * per + p;
            const float *restrict o = off + r * channels;
            for (int64_t t = 0; t < tokens; ++t) {
                const uint8_t *restrict src =
                    syms + (((p * tokens + t) * nb + b) * groups + g) * channels;
                const float s = step[r * tokens + t];
                const int64_t at = (r * tokens + t) * channels;
                if (kind == 0) {
                    float *restrict dst = (float *)out + at;
                    for (int64_t c = 0; c < channels; ++c)
                        dst[c] = ((float)src[c] + o[c]) * s;
                } else if (kind == 1) {
                    uint16_t *restrict dst = (uint16_t *)out + at;
                    for (int64_t c = 0; c < channels; ++c)
                        dst[c] = to_bf16(((float)src[c] + o[c]) * s);
                } else {
                    uint16_t *restrict dst = (uint16_t *)out + at;
                    for (int64_t c = 0; c < channels; ++c)
                        dst[c] = to_f16(((float)src[c] + o[c]) * s);
                }
            }
        }
    return 0;
}
