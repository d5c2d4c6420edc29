#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "spool/error.h"

static void every_code_has_name_and_message(void **state)
{
    (void)state;
#define XX(code, msg)                                                                              \
    assert_string_equal(sp_err_name(SP_##code), "SP_" #code);                                      \
    assert_string_equal(sp_strerror(SP_##code), msg);                                              \
    assert_true(SP_##code < 0);
    SP_ERRNO_MAP(XX)
#undef XX
    assert_string_equal(sp_strerror(0), "success");
    assert_string_equal(sp_strerror(12345), "unknown error");
    assert_string_equal(sp_err_name(-1), "SP_EUNKNOWN");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_code_has_name_and_message),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
