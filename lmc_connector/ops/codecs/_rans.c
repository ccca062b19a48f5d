/* Interleaved rANS, bit for bit the coder of rans_torch.py, as plain C for the CPU.
 *
 * State x is a uint32 in [L, 2**31), words are 16 bits, probabilities PREC bits. At each step
 * every stream codes one symbol; the words that step emits lie in the output in stream order,
 * and steps follow each other in decode order. Built at first use by rans_native.py and called
 * through ctypes (which releases the GIL).
 *
 * Each step is split into a pass over all streams without dependencies between them (the
 * compiler vectorises it, with gathers for the table lookups; on x86-64 one clone per
 * instruction set is picked at load time) and a scalar pass that places or fetches the words
 * (each stream's word position depends on all earlier streams'). x / freq is one double
 * division: exact, as x < 2**31 and freq < 2**12 keep the quotient more than 2**-12 away from
 * the next integer whenever it is not one.
 *
 * Every index into a table or a buffer is checked or masked: corrupt input makes the caller's
 * end-state check fail, never reads out of range.
 */
#include <stdint.h>
#include <stdlib.h>

#include "_kernels.h"

#define PREC 12
#define MASK ((1u << PREC) - 1)
#define LOW (1u << 15)
#define ENC_C 13
#define SYM_BITS 7

/* One encoder step over all streams: codes the symbols of `row`, leaves each stream's
 * candidate word in w and whether it is emitted in flag. Returns nonzero on a bad code. */
SIMD static uint32_t enc_step(const int16_t *restrict row, int64_t streams,
                              const int32_t *restrict enc, uint32_t enc_len,
                              uint32_t *restrict states, uint16_t *restrict w,
                              uint8_t *restrict flag)
{
    uint32_t bad = 0;
    for (int64_t s = 0; s < streams; ++s) {
        const uint32_t c = (uint16_t)row[s];
        const uint32_t ok = c < enc_len;
        bad |= ok ^ 1u;
        const uint32_t e = (uint32_t)enc[c & -ok];
        uint32_t freq = e & MASK;
        uint32_t x = states[s];
        uint32_t emit = x >= (freq << 19);
        w[s] = (uint16_t)x;
        flag[s] = (uint8_t)emit;
        x >>= emit << 4;
        uint32_t q = (uint32_t)(int32_t)((double)(int32_t)x / (double)(int32_t)freq);
        states[s] = x + (e >> ENC_C) + q * ((1u << PREC) - freq);
    }
    return bad;
}

/* Encode one run. codes: int16 [steps][stride], the first `streams` of each row used
 * (distribution * alphabet + symbol, each < enc_len); enc[i] = freq | cum << 13. out has room
 * for cap >= steps * streams + 1 words; they end at out[cap - 1]. Returns the word count, or
 * -1 on a bad code, a short buffer or no memory. */
int64_t lmc_rans_encode(const int16_t *restrict codes, int64_t steps, int64_t streams,
                        int64_t stride, const int32_t *restrict enc, int64_t enc_len,
                        uint32_t *restrict states, uint16_t *restrict out, int64_t cap)
{
    if (cap < steps * streams + 1 || enc_len > UINT16_MAX + 1)
        return -1;
    uint16_t *w = malloc((size_t)streams * sizeof *w + 1);
    uint8_t *flag = malloc((size_t)streams + 1);
    int64_t ptr = cap;
    if (w == NULL || flag == NULL)
        ptr = cap + 1;
    for (int64_t s = 0; s < streams; ++s)
        states[s] = LOW;
    for (int64_t t = steps - 1; t >= 0 && ptr <= cap; --t) {
        if (enc_step(codes + t * stride, streams, enc, (uint32_t)enc_len, states, w, flag)) {
            ptr = cap + 1;
            break;
        }
        for (int64_t s = streams - 1; s >= 0; --s) {
            out[ptr - 1] = w[s];
            ptr -= flag[s];
        }
    }
    free(w);
    free(flag);
    return ptr > cap ? -1 : cap - ptr;
}

/* One decoder step over all streams: the symbols into o, the states before renormalisation,
 * and which streams need a word. */
SIMD static void dec_step(uint32_t *restrict states, const int32_t *restrict dist,
                          int64_t streams, const int32_t *restrict dec, uint8_t *restrict o,
                          uint32_t *restrict need)
{
    for (int64_t s = 0; s < streams; ++s) {
        uint32_t x = states[s];
        uint32_t e = (uint32_t)dec[((uint32_t)dist[s] << PREC) | (x & MASK)];
        o[s] = (uint8_t)(e & ((1u << SYM_BITS) - 1));
        x = (e >> (SYM_BITS + PREC)) * (x >> PREC) + ((e >> SYM_BITS) & MASK);
        need[s] = x < LOW;
        states[s] = x;
    }
}

SIMD static void dec_refill(uint32_t *restrict states, const uint32_t *restrict word,
                            const uint32_t *restrict need, int64_t streams)
{
    for (int64_t s = 0; s < streams; ++s)
        states[s] = need[s] ? (states[s] << 16) | word[s] : states[s];
}

/* Decode one run. words: uint16 [nwords], read in place (reads past the end, which only
 * corrupt input asks for, read the last word instead; nwords may be 0 and words NULL);
 * states: uint32 [streams], in: the encoder's final states (each in [L, 2**31)),
 * out: the end states. dists: int32 [nblk][streams], distribution index per stream and block
 * of `tokens` steps (each < dec_len >> PREC). dec[i] = sym | bias << 7 | freq << 19.
 * out: uint8 [nblk * tokens][out_stride]. Returns the words consumed (not nwords: corrupt). */
int64_t lmc_rans_decode(const uint16_t *restrict words, int64_t nwords,
                        uint32_t *restrict states, const int32_t *restrict dists, int64_t nblk,
                        int64_t tokens, int64_t streams, const int32_t *restrict dec,
                        int64_t dec_len, uint8_t *restrict out, int64_t out_stride)
{
    for (int64_t i = 0; i < nblk * streams; ++i)
        if (dists[i] < 0 || ((int64_t)dists[i] + 1) << PREC > dec_len)
            return nwords + 1;
    static const uint16_t none = 0;
    const uint16_t *from = nwords > 0 ? words : &none;
    const int64_t last = nwords > 0 ? nwords - 1 : 0;
    uint32_t *need = malloc((size_t)streams * sizeof *need + 1);
    uint32_t *word = malloc((size_t)streams * sizeof *word + 1);
    int64_t ptr = need == NULL || word == NULL ? nwords + 1 : 0;
    for (int64_t b = 0; b < nblk; ++b) {
        for (int64_t tt = 0; tt < tokens && ptr <= nwords; ++tt) {
            dec_step(states, dists + b * streams, streams, dec,
                     out + (b * tokens + tt) * out_stride, need);
            for (int64_t s = 0; s < streams; ++s) {
                word[s] = from[ptr < last ? ptr : last];
                ptr += need[s];
            }
            dec_refill(states, word, need, streams);
        }
    }
    free(need);
    free(word);
    return ptr;
}
