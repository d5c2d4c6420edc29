#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "spool/log.h"

/* Captures what the logger writes through a pipe. */
static char *capture(void (*fn)(void))
{
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    sp_log_set_fd(fds[1]);
    fn();
    sp_log_set_fd(2);
    close(fds[1]);
    static char buf[65536];
    size_t n = 0;
    ssize_t got;
    while ((got = read(fds[0], buf + n, sizeof buf - 1 - n)) > 0)
        n += (size_t)got;
    buf[n] = '\0';
    close(fds[0]);
    return buf;
}

static void log_some(void)
{
    sp_debug("hidden %d", 1);
    sp_info("hello \"world\"\n\ttab \x01 and \xff bad utf8 and caf\xc3\xa9");
    sp_error("boom %s", "now");
}

static void plain_lines_respect_level(void **state)
{
    (void)state;
    sp_log_init("unit");
    sp_log_set_json(false);
    sp_log_set_level(SP_LOG_INFO);
    char *out = capture(log_some);
    assert_null(strstr(out, "hidden"));
    assert_non_null(strstr(out, "info  unit["));
    assert_non_null(strstr(out, "error unit["));
    assert_non_null(strstr(out, "boom now\n"));
}

static void json_lines_parse(void **state)
{
    (void)state;
    sp_log_init("unit");
    sp_log_set_json(true);
    sp_log_set_level(SP_LOG_DEBUG);
    char *out = capture(log_some);
    sp_log_set_json(false);
    int lines = 0;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        json_error_t err;
        json_t *obj = json_loads(line, 0, &err);
        if (!obj)
            fail_msg("not JSON: %s (%s)", line, err.text);
        assert_string_equal(json_string_value(json_object_get(obj, "component")), "unit");
        assert_non_null(json_object_get(obj, "ts"));
        if (lines == 1) {
            const char *msg = json_string_value(json_object_get(obj, "msg"));
            assert_non_null(strstr(msg, "hello \"world\"\n\ttab \x01"));
            assert_non_null(strstr(msg, "caf\xc3\xa9"));
            assert_string_equal(json_string_value(json_object_get(obj, "level")), "info");
        }
        json_decref(obj);
        lines++;
    }
    assert_int_equal(lines, 3);
}

static void parse_level(void **state)
{
    (void)state;
    assert_int_equal(sp_log_parse_level("DEBUG"), SP_LOG_DEBUG);
    assert_int_equal(sp_log_parse_level("warning"), SP_LOG_WARN);
    assert_int_equal(sp_log_parse_level("nope"), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(plain_lines_respect_level),
        cmocka_unit_test(json_lines_parse),
        cmocka_unit_test(parse_level),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
