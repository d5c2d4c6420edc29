/*
 * The CUDA backend's host-side helpers (engine/cuda/host.h), which run
 * without a GPU: bf16 rounding and f16 decoding used when loading weights,
 * and the rope frequency table (llama3 scaling as in transformers).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../../../engine/cuda/host.h"

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_bf16_rounding(void **state)
{
    (void)state;
    assert_int_equal(se__cu_f32_to_bf16(1.0f), 0x3F80);
    assert_int_equal(se__cu_f32_to_bf16(-2.0f), 0xC000);
    assert_int_equal(se__cu_f32_to_bf16(-0.0f), 0x8000);
    /* Halfway cases round to even: 1 + 2^-8 down to 1, 1 + 3 * 2^-8 up to 1 + 2^-6. */
    assert_int_equal(se__cu_f32_to_bf16(from_bits(0x3F808000u)), 0x3F80);
    assert_int_equal(se__cu_f32_to_bf16(from_bits(0x3F818000u)), 0x3F82);
    /* Just above halfway rounds up; just below rounds down. */
    assert_int_equal(se__cu_f32_to_bf16(from_bits(0x3F808001u)), 0x3F81);
    assert_int_equal(se__cu_f32_to_bf16(from_bits(0x3F807FFFu)), 0x3F80);
    assert_int_equal(se__cu_f32_to_bf16(INFINITY), 0x7F80);
    assert_int_equal(se__cu_f32_to_bf16(-INFINITY), 0xFF80);
    /* The largest float rounds up to infinity, as round-to-nearest-even must. */
    assert_int_equal(se__cu_f32_to_bf16(from_bits(0x7F7FFFFFu)), 0x7F80);
    /* A NaN whose payload sits in the low bits stays a NaN. */
    uint16_t n = se__cu_f32_to_bf16(from_bits(0x7F800001u));
    assert_true((n & 0x7F80) == 0x7F80 && (n & 0x7F) != 0);
    /* Every bf16 value converts back to itself. */
    for (uint32_t b = 0; b < 0x10000; b++) {
        if ((b & 0x7F80) == 0x7F80 && (b & 0x7F))
            continue; /* NaN payloads are quieted */
        assert_int_equal(se__cu_f32_to_bf16(from_bits(b << 16)), b);
    }
}

static void test_f16_decoding(void **state)
{
    (void)state;
    assert_true(se__cu_f16_to_f32(0x3C00) == 1.0f);
    assert_true(se__cu_f16_to_f32(0xC000) == -2.0f);
    assert_true(se__cu_f16_to_f32(0x3555) == 0.333251953125f);
    assert_true(se__cu_f16_to_f32(0x7BFF) == 65504.0f);
    assert_true(se__cu_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    assert_true(se__cu_f16_to_f32(0x03FF) == ldexpf(1023.0f, -24));
    assert_true(se__cu_f16_to_f32(0x0400) == ldexpf(1.0f, -14));
    assert_true(se__cu_f16_to_f32(0x8000) == 0.0f && signbit(se__cu_f16_to_f32(0x8000)));
    assert_true(isinf(se__cu_f16_to_f32(0x7C00)) && se__cu_f16_to_f32(0x7C00) > 0);
    assert_true(isinf(se__cu_f16_to_f32(0xFC00)) && se__cu_f16_to_f32(0xFC00) < 0);
    assert_true(isnan(se__cu_f16_to_f32(0x7E00)));
    /* Every finite half is value-exact: compare with ldexp of its fields. */
    for (uint32_t h = 0; h < 0x10000; h++) {
        const int ex = (h >> 10) & 31, man = h & 0x3FF;
        if (ex == 31)
            continue;
        double v = ex ? ldexp(1024 + man, ex - 25) : ldexp(man, -24);
        if (h & 0x8000)
            v = -v;
        assert_true(se__cu_f16_to_f32((uint16_t)h) == (float)v);
    }
}

static void test_rope_frequencies(void **state)
{
    (void)state;
    struct se_model_config c;
    memset(&c, 0, sizeof c);
    c.head_dim = 128;
    c.rope_theta = 500000.0f;
    float got[64];
    se__cu_rope_inv_freq(&c, got);
    for (int i = 0; i < 64; i++)
        assert_float_equal(got[i], 1.0 / pow(500000.0, i / 64.0), 1e-6 * got[i]);

    /* Llama 3.1: factor 8, low 1, high 4, original context 8192. */
    c.rope_llama3 = true;
    c.rope_factor = 8.0f;
    c.rope_low_freq_factor = 1.0f;
    c.rope_high_freq_factor = 4.0f;
    c.rope_original_max_position = 8192;
    se__cu_rope_inv_freq(&c, got);
    int bands[3] = {0, 0, 0};
    for (int i = 0; i < 64; i++) {
        const double f = 1.0 / pow(500000.0, i / 64.0), wl = 2 * M_PI / f;
        double want;
        if (wl < 8192.0 / 4) {
            want = f, bands[0]++;
        } else if (wl > 8192.0 / 1) {
            want = f / 8, bands[2]++;
        } else {
            const double sm = (8192.0 / wl - 1) / (4 - 1);
            want = (1 - sm) * f / 8 + sm * f, bands[1]++;
        }
        assert_float_equal(got[i], want, 1e-6 * want);
    }
    /* The case covers all three bands, and the frequencies still decrease. */
    assert_true(bands[0] > 0 && bands[1] > 0 && bands[2] > 0);
    for (int i = 1; i < 64; i++)
        assert_true(got[i] < got[i - 1]);
    /* The first of Llama 3.1's frequencies is 1; its lowest is theta^(-126/128) / 8. */
    assert_float_equal(got[0], 1.0, 1e-7);
    assert_float_equal(got[63], pow(500000.0, -126.0 / 128) / 8, 1e-6 * got[63]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_rounding),
        cmocka_unit_test(test_f16_decoding),
        cmocka_unit_test(test_rope_frequencies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
