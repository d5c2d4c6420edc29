/* multipart/form-data parsing (scheduler/multipart.c): the shape the openai
 * clients send, quoting, line ends, and every kind of malformed body. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "multipart.h"
#include "spool/error.h"

static char err[256];

static void boundary_from_content_type(void **state)
{
    (void)state;
    char b[SCHED_MP_MAX_BOUNDARY + 1];
    assert_int_equal(sched_mp_boundary("multipart/form-data; boundary=----formdata-undici-0123", b,
                                       err, sizeof err),
                     0);
    assert_string_equal(b, "----formdata-undici-0123");
    assert_int_equal(sched_mp_boundary("Multipart/Form-Data ;charset=utf-8; BOUNDARY=\"a b;c\"", b,
                                       err, sizeof err),
                     0);
    assert_string_equal(b, "a b;c");
    assert_int_equal(sched_mp_boundary("application/json", b, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "multipart/form-data"));
    assert_int_equal(sched_mp_boundary(NULL, b, err, sizeof err), SP_EINVAL);
    assert_int_equal(sched_mp_boundary("multipart/form-data", b, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "no boundary"));
    assert_int_equal(sched_mp_boundary("multipart/form-data; boundary=", b, err, sizeof err),
                     SP_EINVAL);
    char longer[200];
    snprintf(longer, sizeof longer, "multipart/form-data; boundary=%071d", 7);
    assert_int_equal(sched_mp_boundary(longer, b, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "longer than 70"));
    /* A parameter named like boundary's suffix is not it. */
    assert_int_equal(sched_mp_boundary("multipart/form-data; xboundary=zz", b, err, sizeof err),
                     SP_EINVAL);
}

/* What undici's FormData (the openai npm client on node) sends. */
static const char openai_body[] =
    "------formdata-undici-0123\r\n"
    "Content-Disposition: form-data; name=\"purpose\"\r\n"
    "\r\n"
    "batch\r\n"
    "------formdata-undici-0123\r\n"
    "Content-Disposition: form-data; name=\"file\"; filename=\"in put %22q%22.jsonl\"\r\n"
    "Content-Type: application/jsonl\r\n"
    "\r\n"
    "{\"a\": 1}\r\n{\"b\": \"--\"}\n\r\n"
    "------formdata-undici-0123--\r\n";

static void parses_what_the_openai_client_sends(void **state)
{
    (void)state;
    struct sched_mp_part parts[4];
    size_t n;
    assert_int_equal(sched_mp_parse(openai_body, sizeof openai_body - 1, "----formdata-undici-0123",
                                    parts, 4, &n, err, sizeof err),
                     0);
    assert_int_equal(n, 2);
    assert_string_equal(parts[0].name, "purpose");
    assert_false(parts[0].has_filename);
    assert_int_equal(parts[0].len, 5);
    assert_memory_equal(parts[0].data, "batch", 5);
    assert_string_equal(parts[1].name, "file");
    assert_true(parts[1].has_filename);
    assert_string_equal(parts[1].filename, "in put \"q\".jsonl");
    const char *want = "{\"a\": 1}\r\n{\"b\": \"--\"}\n";
    assert_int_equal(parts[1].len, strlen(want));
    assert_memory_equal(parts[1].data, want, strlen(want));
}

static void preamble_quoting_lf_and_empty_parts(void **state)
{
    (void)state;
    static const char body[] = "preamble text\r\n"
                               "--XyZ\n"
                               "content-disposition: form-data; filename=\"a\\\"b.jsonl\"; name=f\n"
                               "\n"
                               "\r\n--XyZ  \r\n"
                               "Content-Disposition: form-data; name=\"e\"\r\n\r\n"
                               "\r\n--XyZ--";
    struct sched_mp_part parts[4];
    size_t n;
    assert_int_equal(sched_mp_parse(body, sizeof body - 1, "XyZ", parts, 4, &n, err, sizeof err),
                     0);
    assert_int_equal(n, 2);
    assert_string_equal(parts[0].name, "f");
    assert_string_equal(parts[0].filename, "a\"b.jsonl");
    assert_int_equal(parts[0].len, 0);
    assert_string_equal(parts[1].name, "e");
    assert_int_equal(parts[1].len, 0);
}

static void malformed_bodies_are_refused(void **state)
{
    (void)state;
    static const struct {
        const char *body, *want;
    } cases[] = {
        {"no delimiter at all", "does not contain its boundary"},
        {"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx", "without its closing"},
        {"--B\r\nContent-Disposition: form-data; name=\"a\"\r\nno blank line",
         "not ended by an empty line"},
        {"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n--B--", "no Content-Disposition"},
        {"--B\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\nx\r\n--B--", "not form-data"},
        {"--B\r\nContent-Disposition: form-data; filename=\"a\"\r\n\r\nx\r\n--B--", "has no name"},
        {"--Bjunk", "without its closing"},
        {"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--B\r\n"
         "Content-Disposition: form-data; name=\"b\"\r\n\r\ny\r\n--B\r\n"
         "Content-Disposition: form-data; name=\"c\"\r\n\r\nz\r\n--B--",
         "too many parts"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct sched_mp_part parts[2];
        size_t n;
        err[0] = '\0';
        int rc = sched_mp_parse(cases[i].body, strlen(cases[i].body), "B", parts, 2, &n, err,
                                sizeof err);
        if (rc != SP_EINVAL || !strstr(err, cases[i].want))
            fail_msg("case %zu: rc %d, err '%s', want '%s'", i, rc, err, cases[i].want);
    }
    char name[300];
    memset(name, 'n', sizeof name);
    name[sizeof name - 1] = '\0';
    char body[600];
    snprintf(body, sizeof body,
             "--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"%s\"\r\n\r\nx\r\n--B--",
             name);
    struct sched_mp_part parts[2];
    size_t n;
    assert_int_equal(sched_mp_parse(body, strlen(body), "B", parts, 2, &n, err, sizeof err),
                     SP_EINVAL);
    assert_non_null(strstr(err, "longer than 255"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(boundary_from_content_type),
        cmocka_unit_test(parses_what_the_openai_client_sends),
        cmocka_unit_test(preamble_quoting_lf_and_empty_parts),
        cmocka_unit_test(malformed_bodies_are_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
