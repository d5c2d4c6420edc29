/*
 * The Prometheus registry and renderer (spool/prom.h): exact text of a small
 * registry, histogram bucket arithmetic against a naive count, label and
 * help escaping (invalid UTF-8 included), number formatting, validation of
 * names, buckets and values, the series cap, many series, and the rendered
 * text checked by a strict checker (prom_check.h) and parsed by the
 * official Python client's parser (argv[1]: prom_parse.py).
 */
#include <math.h>
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

#include "prom_check.h"
#include "spool/error.h"
#include "spool/prom.h"

static const char *parse_script;

static char *render(const sp_prom_t *r)
{
    char *text;
    size_t len;
    assert_int_equal(sp_prom_render(r, &text, &len), 0);
    assert_int_equal(strlen(text), len);
    char err[256];
    if (prom_check(text, err, sizeof err) != 0)
        fail_msg("strict check: %s\n%s", err, text);
    return text;
}

/* The value on the line that starts with prefix (the whole name and labels). */
static double line_value(const char *text, const char *prefix)
{
    size_t n = strlen(prefix);
    for (const char *p = text; *p;) {
        if (strncmp(p, prefix, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        const char *nl = strchr(p, '\n');
        if (!nl)
            break;
        p = nl + 1;
    }
    fail_msg("no line %s in\n%s", prefix, text);
    return 0;
}

static void exact_text_of_a_small_registry(void **state)
{
    (void)state;
    sp_prom_t *r;
    assert_int_equal(sp_prom_new(&r), 0);
    sp_prom_family_t *req, *temp, *lat, *empty;
    static const char *const lane_status[] = {"lane", "status", NULL};
    static const char *const model[] = {"model", NULL};
    static const double bounds[] = {0.25, 0.5, 1};
    struct sp_prom_spec s1 = {SP_PROM_COUNTER,
                              "t_requests_total",
                              "Requests.\nSecond line \\ here",
                              lane_status,
                              NULL,
                              0,
                              0};
    struct sp_prom_spec s2 = {SP_PROM_GAUGE, "t_temp", "A gauge.", NULL, NULL, 0, 0};
    struct sp_prom_spec s3 = {
        SP_PROM_HISTOGRAM, "t_latency_seconds", "Latency \"quoted\".", model, bounds, 3, 0};
    struct sp_prom_spec s4 = {
        SP_PROM_COUNTER, "t_empty_total", "No series yet.", model, NULL, 0, 0};
    assert_int_equal(sp_prom_family(r, &s1, &req), 0);
    assert_int_equal(sp_prom_family(r, &s2, &temp), 0);
    assert_int_equal(sp_prom_family(r, &s3, &lat), 0);
    assert_int_equal(sp_prom_family(r, &s4, &empty), 0);

    const char *live200[] = {"live", "200"}, *batchok[] = {"batch", "ok"}, *m1[] = {"m@1"};
    assert_int_equal(sp_prom_inc(req, live200, 1), 0);
    assert_int_equal(sp_prom_inc(req, batchok, 2.5), 0);
    assert_int_equal(sp_prom_inc(req, live200, 2), 0);
    assert_int_equal(sp_prom_set(temp, NULL, 0.25), 0);
    const double obs[] = {0.125, 0.25, 0.375, 1, 7};
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(sp_prom_observe(lat, m1, obs[i]), 0);

    char *text = render(r);
    assert_string_equal(text, "# HELP t_requests_total Requests.\\nSecond line \\\\ here\n"
                              "# TYPE t_requests_total counter\n"
                              "t_requests_total{lane=\"live\",status=\"200\"} 3\n"
                              "t_requests_total{lane=\"batch\",status=\"ok\"} 2.5\n"
                              "# HELP t_temp A gauge.\n"
                              "# TYPE t_temp gauge\n"
                              "t_temp 0.25\n"
                              "# HELP t_latency_seconds Latency \"quoted\".\n"
                              "# TYPE t_latency_seconds histogram\n"
                              "t_latency_seconds_bucket{model=\"m@1\",le=\"0.25\"} 2\n"
                              "t_latency_seconds_bucket{model=\"m@1\",le=\"0.5\"} 3\n"
                              "t_latency_seconds_bucket{model=\"m@1\",le=\"1\"} 4\n"
                              "t_latency_seconds_bucket{model=\"m@1\",le=\"+Inf\"} 5\n"
                              "t_latency_seconds_sum{model=\"m@1\"} 8.75\n"
                              "t_latency_seconds_count{model=\"m@1\"} 5\n"
                              "# HELP t_empty_total No series yet.\n"
                              "# TYPE t_empty_total counter\n");
    free(text);

    double v;
    assert_int_equal(sp_prom_get(req, live200, &v), 0);
    assert_true(v == 3);
    assert_int_equal(sp_prom_get(lat, m1, &v), 0);
    assert_true(v == 5);
    const char *nope[] = {"m@2"};
    assert_int_equal(sp_prom_get(lat, nope, &v), SP_ENOENT);

    /* Clearing a gauge family leaves its HELP and TYPE. */
    sp_prom_clear(req);
    assert_int_equal(sp_prom_get(req, live200, &v), SP_ENOENT);
    text = render(r);
    assert_non_null(strstr(text, "# TYPE t_requests_total counter\n# HELP t_temp"));
    free(text);
    sp_prom_free(r);
}

static void unlabelled_histogram_starts_at_zero(void **state)
{
    (void)state;
    sp_prom_t *r;
    sp_prom_family_t *h;
    assert_int_equal(sp_prom_new(&r), 0);
    static const double b[] = {1e-3, 2};
    struct sp_prom_spec s = {SP_PROM_HISTOGRAM, "h", "H.", NULL, b, 2, 0};
    assert_int_equal(sp_prom_family(r, &s, &h), 0);
    char *text = render(r);
    assert_string_equal(text, "# HELP h H.\n# TYPE h histogram\n"
                              "h_bucket{le=\"0.001\"} 0\nh_bucket{le=\"2\"} 0\n"
                              "h_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n");
    free(text);
    /* No buckets at all: only +Inf. */
    sp_prom_family_t *h2;
    struct sp_prom_spec s2 = {SP_PROM_HISTOGRAM, "h2", "H2.", NULL, NULL, 0, 0};
    assert_int_equal(sp_prom_family(r, &s2, &h2), 0);
    assert_int_equal(sp_prom_observe(h2, NULL, -4), 0);
    text = render(r);
    assert_non_null(strstr(text, "h2_bucket{le=\"+Inf\"} 1\nh2_sum -4\nh2_count 1\n"));
    free(text);
    sp_prom_free(r);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void bucket_math_matches_a_naive_count(void **state)
{
    (void)state;
    static const double b[] = {-1, 0, 0.001, 0.01, 0.1, 0.5, 1, 2.5, 10, 100};
    const size_t nb = sizeof b / sizeof *b;
    sp_prom_t *r;
    sp_prom_family_t *h;
    static const char *const lab[] = {"k", NULL};
    assert_int_equal(sp_prom_new(&r), 0);
    struct sp_prom_spec s = {SP_PROM_HISTOGRAM, "bm", "Bucket math.", lab, b, nb, 0};
    assert_int_equal(sp_prom_family(r, &s, &h), 0);
    enum { N = 20000 };
    double *vals = malloc(N * sizeof *vals);
    assert_non_null(vals);
    double sum = 0;
    for (int i = 0; i < N; i++) {
        uint64_t x = next_rand();
        double v;
        if (x % 4 == 0)
            v = b[(x >> 8) % nb]; /* exactly a bound: belongs to that bucket */
        else if (x % 4 == 1)
            v = -2 + (double)((x >> 8) % 1000) / 100.0;
        else
            v = (double)((x >> 8) % 1000000) / 1000.0;
        vals[i] = v;
        sum += v;
        const char *k[] = {i % 2 ? "odd" : "even"};
        assert_int_equal(sp_prom_observe(h, k, v), 0);
    }
    char *text = render(r);
    for (int parity = 0; parity < 2; parity++) {
        const char *k = parity ? "odd" : "even";
        char prefix[128], num[32];
        double count = 0, psum = 0;
        for (int i = parity; i < N; i += 2) {
            count++;
            psum += vals[i];
        }
        for (size_t j = 0; j < nb; j++) {
            double naive = 0;
            for (int i = parity; i < N; i += 2)
                naive += vals[i] <= b[j];
            snprintf(prefix, sizeof prefix, "bm_bucket{k=\"%s\",le=\"%s\"}", k,
                     sp_prom_format_double(b[j], num));
            assert_true(line_value(text, prefix) == naive);
        }
        snprintf(prefix, sizeof prefix, "bm_bucket{k=\"%s\",le=\"+Inf\"}", k);
        assert_true(line_value(text, prefix) == count);
        snprintf(prefix, sizeof prefix, "bm_count{k=\"%s\"}", k);
        assert_true(line_value(text, prefix) == count);
        snprintf(prefix, sizeof prefix, "bm_sum{k=\"%s\"}", k);
        double got = line_value(text, prefix);
        assert_true(fabs(got - psum) <= 1e-9 * fabs(psum) + 1e-9);
    }
    (void)sum;
    free(text);
    free(vals);
    sp_prom_free(r);
}

static void label_values_and_help_are_escaped(void **state)
{
    (void)state;
    sp_prom_t *r;
    sp_prom_family_t *g;
    static const char *const lab[] = {"v", NULL};
    assert_int_equal(sp_prom_new(&r), 0);
    struct sp_prom_spec s = {
        SP_PROM_GAUGE, "esc", "Back\\slash, \"quote\", new\nline.", lab, NULL, 0, 0};
    assert_int_equal(sp_prom_family(r, &s, &g), 0);
    const char *a[] = {"a\\b\"c\nd"};
    const char *b[] = {"\xff|\xc3(|\xc0\xaf|\xed\xa0\x80|\xf4\x90\x80\x80|\xe2\x82"};
    const char *c[] = {"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80 ok {},="};
    const char *d[] = {NULL};
    assert_int_equal(sp_prom_set(g, a, 1), 0);
    assert_int_equal(sp_prom_set(g, b, 2), 0);
    assert_int_equal(sp_prom_set(g, c, 3), 0);
    assert_int_equal(sp_prom_set(g, d, 4), 0);
    char *text = render(r);
    assert_string_equal(text, "# HELP esc Back\\\\slash, \"quote\", new\\nline.\n"
                              "# TYPE esc gauge\n"
                              "esc{v=\"a\\\\b\\\"c\\nd\"} 1\n"
                              /* each invalid byte becomes U+FFFD; a truncated sequence too */
                              "esc{v=\"\xef\xbf\xbd|\xef\xbf\xbd(|\xef\xbf\xbd\xef\xbf\xbd|"
                              "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd|"
                              "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd|"
                              "\xef\xbf\xbd\xef\xbf\xbd\"} 2\n"
                              "esc{v=\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80 ok {},=\"} 3\n"
                              "esc{v=\"\"} 4\n");
    free(text);
    sp_prom_free(r);
}

static void numbers_are_formatted_as_prometheus_reads_them(void **state)
{
    (void)state;
    const struct {
        double v;
        const char *s;
    } cases[] = {
        {0, "0"},
        {-0.0, "0"},
        {42, "42"},
        {-3, "-3"},
        {0.1, "0.1"},
        {0.25, "0.25"},
        {1e-6, "1e-06"},
        {1.5e300, "1.5e+300"},
        {123456789012, "123456789012"},
        {9007199254740992.0, "9007199254740992"},
        {1e17, "1e+17"},
        {1.0 / 3, "0.3333333333333333"},
        {NAN, "NaN"},
        {INFINITY, "+Inf"},
        {-INFINITY, "-Inf"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char buf[32];
        assert_string_equal(sp_prom_format_double(cases[i].v, buf), cases[i].s);
        if (!isnan(cases[i].v))
            assert_true(strtod(buf[0] == '+' ? buf + 1 : buf, NULL) == cases[i].v);
    }
    /* Random doubles read back exactly. */
    for (int i = 0; i < 10000; i++) {
        uint64_t bits = next_rand();
        double v;
        memcpy(&v, &bits, sizeof v);
        if (!isfinite(v))
            continue;
        char buf[32];
        sp_prom_format_double(v, buf);
        assert_true(strtod(buf, NULL) == v);
    }
}

static void bad_specs_and_values_are_refused(void **state)
{
    (void)state;
    sp_prom_t *r;
    sp_prom_family_t *f, *c, *g, *h;
    assert_int_equal(sp_prom_new(&r), 0);
    static const char *const ok_labels[] = {"a", "b", NULL};
    static const char *const dup[] = {"a", "a", NULL};
    static const char *const reserved[] = {"__x", NULL};
    static const char *const bad[] = {"1a", NULL};
    static const char *const colon[] = {"a:b", NULL};
    static const char *const le[] = {"le", NULL};
    static const double desc[] = {1, 0.5};
    static const double same[] = {1, 1};
    static const double inf[] = {1, INFINITY};
    static const double nan_b[] = {NAN};
    const struct {
        struct sp_prom_spec spec;
        int rc;
    } cases[] = {
        {{SP_PROM_COUNTER, "", "x", NULL, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, NULL, "x", NULL, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "9lives", "x", NULL, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "has-dash", "x", NULL, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "ok_total", "", NULL, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "ok_total", NULL, NULL, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "ok_total", "x", dup, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "ok_total", "x", reserved, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "ok_total", "x", bad, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_COUNTER, "ok_total", "x", colon, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_HISTOGRAM, "ok_h", "x", le, NULL, 0, 0}, SP_EINVAL},
        {{SP_PROM_HISTOGRAM, "ok_h", "x", NULL, desc, 2, 0}, SP_EINVAL},
        {{SP_PROM_HISTOGRAM, "ok_h", "x", NULL, same, 2, 0}, SP_EINVAL},
        {{SP_PROM_HISTOGRAM, "ok_h", "x", NULL, inf, 2, 0}, SP_EINVAL},
        {{SP_PROM_HISTOGRAM, "ok_h", "x", NULL, nan_b, 1, 0}, SP_EINVAL},
        {{(enum sp_prom_type)7, "ok_x", "x", NULL, NULL, 0, 0}, SP_EINVAL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        f = (sp_prom_family_t *)&f;
        assert_int_equal(sp_prom_family(r, &cases[i].spec, &f), cases[i].rc);
        assert_null(f);
        assert_true(strlen(sp_prom_errmsg(r)) > 0);
    }
    /* "le" is an ordinary label outside histograms; colons are fine in metric names. */
    struct sp_prom_spec sc = {SP_PROM_COUNTER, "ns:ok_total", "x", ok_labels, NULL, 0, 2};
    struct sp_prom_spec sg = {SP_PROM_GAUGE, "ok_g", "x", le, NULL, 0, 0};
    struct sp_prom_spec sh = {SP_PROM_HISTOGRAM, "ok_h", "x", NULL, desc + 1, 1, 0};
    assert_int_equal(sp_prom_family(r, &sc, &c), 0);
    assert_int_equal(sp_prom_family(r, &sg, &g), 0);
    assert_int_equal(sp_prom_family(r, &sh, &h), 0);
    assert_int_equal(sp_prom_family(r, &sc, &f), SP_EEXIST);
    assert_non_null(strstr(sp_prom_errmsg(r), "ns:ok_total"));

    const char *v1[] = {"x", "1"}, *v2[] = {"x", "2"}, *v3[] = {"x", "3"}, *one[] = {"y"};
    assert_int_equal(sp_prom_inc(c, v1, -1), SP_EINVAL);
    assert_int_equal(sp_prom_inc(c, v1, NAN), SP_EINVAL);
    assert_int_equal(sp_prom_inc(c, v1, INFINITY), SP_EINVAL);
    assert_int_equal(sp_prom_set(c, v1, 1), SP_EINVAL);
    assert_int_equal(sp_prom_observe(c, v1, 1), SP_EINVAL);
    assert_int_equal(sp_prom_inc(h, NULL, 1), SP_EINVAL);
    assert_int_equal(sp_prom_observe(h, NULL, NAN), SP_EINVAL);
    assert_int_equal(sp_prom_inc(g, one, -2.5), 0); /* gauges go down */
    assert_int_equal(sp_prom_set(g, one, NAN), 0);
    /* max_series 2: a third label set is refused, the first two still count. */
    assert_int_equal(sp_prom_inc(c, v1, 1), 0);
    assert_int_equal(sp_prom_inc(c, v2, 1), 0);
    assert_int_equal(sp_prom_inc(c, v3, 1), SP_ETOOBIG);
    assert_non_null(strstr(sp_prom_errmsg(r), "ns:ok_total"));
    assert_int_equal(sp_prom_inc(c, v1, 1), 0);
    double v;
    assert_int_equal(sp_prom_get(c, v1, &v), 0);
    assert_true(v == 2);
    assert_int_equal(sp_prom_get(c, v3, &v), SP_ENOENT);
    free(render(r));
    sp_prom_free(r);
    sp_prom_free(NULL);
}

static void many_series_are_found_again(void **state)
{
    (void)state;
    sp_prom_t *r;
    sp_prom_family_t *c;
    static const char *const lab[] = {"a", "b", NULL};
    assert_int_equal(sp_prom_new(&r), 0);
    struct sp_prom_spec s = {SP_PROM_COUNTER, "many_total", "Many.", lab, NULL, 0, 0};
    assert_int_equal(sp_prom_family(r, &s, &c), 0);
    enum { N = 3000 };
    char a[32], b[32];
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < N; i++) {
            int k = round ? N - 1 - i : i;
            /* "ab"+"c" and "a"+"bc" must be different series. */
            snprintf(a, sizeof a, "x%d", k / 10);
            snprintf(b, sizeof b, "%d", k % 10);
            const char *v[] = {a, b};
            assert_int_equal(sp_prom_inc(c, v, k + 1), 0);
        }
    for (int k = 0; k < N; k++) {
        snprintf(a, sizeof a, "x%d", k / 10);
        snprintf(b, sizeof b, "%d", k % 10);
        const char *v[] = {a, b};
        double got;
        assert_int_equal(sp_prom_get(c, v, &got), 0);
        assert_true(got == 2.0 * (k + 1));
    }
    const char *split1[] = {"x1", "23"}, *split2[] = {"x12", "3"};
    assert_int_equal(sp_prom_inc(c, split1, 1), 0);
    double got;
    assert_int_equal(sp_prom_get(c, split2, &got), 0);
    assert_true(got == 2.0 * 124);
    char *text = render(r);
    size_t lines = 0;
    for (const char *p = text; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 2 + N + 1);
    free(text);
    sp_prom_clear(c);
    const char *v[] = {"x0", "0"};
    assert_int_equal(sp_prom_get(c, v, &got), SP_ENOENT);
    assert_int_equal(sp_prom_inc(c, v, 5), 0);
    assert_int_equal(sp_prom_get(c, v, &got), 0);
    assert_true(got == 5);
    sp_prom_free(r);
}

static void strict_checker_catches_bad_text(void **state)
{
    (void)state;
    /* The checker itself must refuse what the format forbids. */
    const char *bad[] = {
        "x 1",                                   /* no final newline */
        "x 1\n",                                 /* no TYPE */
        "# TYPE x gauge\nx{a=\"b} 1\n",          /* unterminated value */
        "# TYPE x gauge\nx{a=\"\\q\"} 1\n",      /* bad escape */
        "# TYPE x gauge\nx{a=\"\xff\"} 1\n",     /* not UTF-8 */
        "# TYPE x gauge\nx 1\nx 2\n",            /* the same series twice */
        "# TYPE x gauge\nx one\n",               /* bad value */
        "# TYPE x gauge\n# TYPE x gauge\nx 1\n", /* TYPE twice */
        "# TYPE x gauge\n# TYPE y gauge\nx{a=\"1\"} 1\ny 1\nx{a=\"2\"} 1\n", /* not contiguous */
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n", /* no +Inf */
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 2\n",
        "# TYPE h histogram\nh_bucket 1\n", /* no le */
    };
    char err[256];
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (prom_check(bad[i], err, sizeof err) == 0)
            fail_msg("the checker accepted case %zu: %s", i, bad[i]);
    assert_int_equal(prom_check("# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\n"
                                "h_bucket{le=\"+Inf\"} 1\nh_sum 0.2\nh_count 1\n",
                                err, sizeof err),
                     0);
}

/* Runs the Python client's parser on text; returns its samples (one JSON object each). */
static json_t *python_parse(const char *text)
{
    char path[] = "/tmp/spool-prom-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t n = strlen(text);
    assert_int_equal(write(fd, text, n), (ssize_t)n);
    close(fd);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 '%s' '%s'", parse_script, path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    json_t *all = json_array();
    char line[8192];
    while (fgets(line, sizeof line, p)) {
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        if (!o)
            fail_msg("prom_parse.py printed '%s'", line);
        json_array_append_new(all, o);
    }
    int st = pclose(p);
    unlink(path);
    if (st != 0)
        fail_msg("prom_parse.py failed (status %d; exit 3 means python3-prometheus-client is "
                 "missing: run ops/setup)",
                 st);
    return all;
}

/* The sample named name whose labels include label=value (NULL: any). */
static json_t *sample(json_t *all, const char *name, const char *label, const char *value)
{
    size_t i;
    json_t *o;
    json_array_foreach(all, i, o)
    {
        if (strcmp(json_string_value(json_object_get(o, "name")), name) != 0)
            continue;
        if (!label)
            return o;
        const char *v = json_string_value(json_object_get(json_object_get(o, "labels"), label));
        if (v && strcmp(v, value) == 0)
            return o;
    }
    fail_msg("no sample %s{%s=%s}", name, label ? label : "", value ? value : "");
    return NULL;
}

static void official_parser_reads_it(void **state)
{
    (void)state;
    sp_prom_t *r;
    sp_prom_family_t *c, *g, *h;
    static const char *const lab[] = {"lane", "model", NULL};
    static const double b[] = {0.001, 0.25, 1e6};
    assert_int_equal(sp_prom_new(&r), 0);
    struct sp_prom_spec sc = {
        SP_PROM_COUNTER, "p_tokens_total", "Tokens \\ and\nmore.", lab, NULL, 0, 0};
    struct sp_prom_spec sg = {SP_PROM_GAUGE, "p_gauge", "G.", lab, NULL, 0, 0};
    struct sp_prom_spec sh = {SP_PROM_HISTOGRAM, "p_seconds", "S.", lab, b, 3, 0};
    assert_int_equal(sp_prom_family(r, &sc, &c), 0);
    assert_int_equal(sp_prom_family(r, &sg, &g), 0);
    assert_int_equal(sp_prom_family(r, &sh, &h), 0);
    const char *tricky[] = {"li\"ve", "a\\b\nc,d=}{"};
    const char *bad_utf8[] = {"x\xffy", "m@1"};
    const char *plain[] = {"batch", "m@2"};
    assert_int_equal(sp_prom_inc(c, tricky, 12345678901), 0);
    assert_int_equal(sp_prom_inc(c, bad_utf8, 0.5), 0);
    assert_int_equal(sp_prom_set(g, tricky, NAN), 0);
    assert_int_equal(sp_prom_set(g, bad_utf8, -INFINITY), 0);
    assert_int_equal(sp_prom_set(g, plain, 1e-300), 0);
    assert_int_equal(sp_prom_observe(h, plain, 0.0005), 0);
    assert_int_equal(sp_prom_observe(h, plain, 0.25), 0);
    assert_int_equal(sp_prom_observe(h, plain, 2e6), 0);
    char *text = render(r);
    json_t *all = python_parse(text);
    free(text);

    json_t *s = sample(all, "p_tokens_total", "lane", "li\"ve");
    assert_string_equal(json_string_value(json_object_get(json_object_get(s, "labels"), "model")),
                        "a\\b\nc,d=}{");
    assert_string_equal(json_string_value(json_object_get(s, "value")), "12345678901.0");
    assert_string_equal(json_string_value(json_object_get(s, "help")), "Tokens \\ and\nmore.");
    s = sample(all, "p_tokens_total", "lane", "x\xef\xbf\xbdy");
    assert_string_equal(json_string_value(json_object_get(s, "value")), "0.5");
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_gauge", "lane", "li\"ve"), "value")),
        "nan");
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_gauge", "model", "m@1"), "value")),
        "-inf");
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_gauge", "model", "m@2"), "value")),
        "1e-300");
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_seconds_bucket", "le", "0.001"), "value")),
        "1.0");
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_seconds_bucket", "le", "0.25"), "value")),
        "2.0");
    assert_string_equal(json_string_value(json_object_get(
                            sample(all, "p_seconds_bucket", "le", "1000000"), "value")),
                        "2.0");
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_seconds_bucket", "le", "+Inf"), "value")),
        "3.0");
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_seconds_count", NULL, NULL), "value")),
        "3.0");
    assert_true(strtod(json_string_value(
                           json_object_get(sample(all, "p_seconds_sum", NULL, NULL), "value")),
                       NULL) == 0.0005 + 0.25 + 2e6);
    assert_string_equal(
        json_string_value(json_object_get(sample(all, "p_seconds_sum", NULL, NULL), "type")),
        "histogram");
    assert_int_equal(json_array_size(all), 2 + 3 + 6);
    json_decref(all);
    sp_prom_free(r);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s PROM_PARSE_PY\n", argv[0]);
        return 2;
    }
    parse_script = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(exact_text_of_a_small_registry),
        cmocka_unit_test(unlabelled_histogram_starts_at_zero),
        cmocka_unit_test(bucket_math_matches_a_naive_count),
        cmocka_unit_test(label_values_and_help_are_escaped),
        cmocka_unit_test(numbers_are_formatted_as_prometheus_reads_them),
        cmocka_unit_test(bad_specs_and_values_are_refused),
        cmocka_unit_test(many_series_are_found_again),
        cmocka_unit_test(strict_checker_catches_bad_text),
        cmocka_unit_test(official_parser_reads_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
