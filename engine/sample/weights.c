/*
 * The one pass of exp over the vocabulary that every token needs (for the
 * log-probability normaliser and the draw's weights), vectorised through
 * glibc's libmvec. It dominates se_sample's cost: scalar exp costs 13 ns an
 * entry on our build machine, libmvec 3-5 ns.
 *
 * GCC vectorises a call only to a function declared with the simd attribute
 * and free of errno; glibc declares exp that way only under -ffast-math, so
 * we declare an alias of exp ourselves (const: libmvec never sets errno) and
 * ask for -O3 on this one function, which the project builds at -O2. The
 * target clones pick libmvec's SSE, AVX2 or AVX-512 variant at load time.
 * The same attributes serve the other passes over every logit (range, temperature).
 * The variants agree with scalar exp to within 1-2 ulp (4.4e-16 relative
 * measured), so which one ran changes a draw only when u * total lies within
 * rounding of a cumulative boundary. Other compilers get plain exp.
 */
#include <math.h>

#include "sample_int.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define VECTORISED                                                                                 \
    __attribute__((optimize("O3"), target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define VECTORISED
#endif

/* Written as selects, not branches, so that they vectorise (maxps, minps, blends). */
VECTORISED bool se__sample_range(const float *restrict logits, size_t n, float *max,
                                 float *min_finite)
{
    float mx = -INFINITY, mn = INFINITY;
    int nan = 0;
    for (size_t i = 0; i < n; i++) {
        float x = logits[i];
        nan |= x != x;
        mx = x > mx ? x : mx;
        mn = x < mn && x > -INFINITY ? x : mn;
    }
    *max = mx;
    *min_finite = mn;
    return nan != 0;
}

VECTORISED void se__sample_scale(float *logits, size_t n, float temperature)
{
    for (size_t i = 0; i < n; i++)
        logits[i] = logits[i] / temperature;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
extern double se__vexp(double) __asm__("exp") __attribute__((simd("notinbranch"), const, nothrow));

__attribute__((optimize("O3"), target_clones("arch=x86-64-v4", "avx2", "default"))) void
se__sample_weights(const float *restrict logits, size_t n, double max, double *restrict w)
{
    for (size_t i = 0; i < n; i++)
        w[i] = se__vexp((double)logits[i] - max);
}
#else
void se__sample_weights(const float *restrict logits, size_t n, double max, double *restrict w)
{
    for (size_t i = 0; i < n; i++)
        w[i] = exp((double)logits[i] - max);
}
#endif
