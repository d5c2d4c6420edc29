/*
 * The sampler's randomness: a pure function of (seed, position), so that a
 * resumed generation draws exactly what an uninterrupted one would have, and
 * so that the CUDA sampler can compute the same numbers. The definition is
 * fixed (docs/architecture.md, "Sampling"); changing it changes every seeded
 * result.
 */
#include "sample_int.h"

uint64_t se__splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double se_sample_uniform(uint64_t seed, uint64_t position)
{
    /* The top 53 bits, scaled by 2^-53: exact in a double, in [0, 1). */
    return (double)(se__splitmix64(seed ^ se__splitmix64(position)) >> 11) * 0x1.0p-53;
}
