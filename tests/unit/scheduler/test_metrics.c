/*
 * The scheduler's metrics (scheduler/metrics.h) without a server: live
 * requests, batch shard token accounting (PROGRESS deltas, USAGE, DONE,
 * shards the scheduler did not assign, eviction), preemptions, worker
 * gauges from the last heartbeat (states, capacity, a reconnected worker's
 * old connection), and the GET /metrics handler through a fake of the
 * sh_* answer functions. Every rendering passes the strict checker and the
 * official Python parser (argv[1]: prom_parse.py).
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

#include "../common/prom_check.h"
#include "metrics.h"
#include "scheduler.h"
#include "spool/error.h"

static const char *parse_script;

/* ---- A fake of the HTTP front's answer functions ---------------------------- */

struct sh_call {
    int status;
    char content_type[128];
    char *body;
    size_t len;
    int answers;
};

void sh_respond_raw(sh_call_t *c, int status, const char *content_type, const void *body,
                    size_t len)
{
    c->status = status;
    snprintf(c->content_type, sizeof c->content_type, "%s", content_type);
    c->body = malloc(len + 1);
    memcpy(c->body, body, len);
    c->body[len] = '\0';
    c->len = len;
    c->answers++;
}

void sh_respond_error(sh_call_t *c, int status, const char *type, const char *param,
                      const char *code, const char *fmt, ...)
{
    (void)param;
    (void)code;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->status = status;
    snprintf(c->content_type, sizeof c->content_type, "error:%s", type);
    c->body = strdup(msg);
    c->len = strlen(msg);
    c->answers++;
}

/* ---- Helpers ---------------------------------------------------------------- */

struct fixture {
    uv_loop_t loop;
    struct sched s;
    int dummy_conn;
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);
    assert_int_equal(uv_loop_init(&fx->loop), 0);
    fx->s.loop = &fx->loop;
    fx->s.cfg.heartbeat_ms = 1000;
    fx->s.cfg.lease_ttl_ms = 5000;
    fx->s.active = true;
    assert_int_equal(sched_metrics_init(&fx->s), 0);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    sched_metrics_stop(&fx->s);
    assert_null(fx->s.metrics);
    uv_loop_close(&fx->loop);
    free(fx);
    return 0;
}

/* Renders, checks strictly, and has the official parser read it. */
static char *scrape(struct sched *s)
{
    char *text;
    size_t len;
    assert_int_equal(sched_metrics_render(s, &text, &len), 0);
    assert_int_equal(strlen(text), len);
    char err[256];
    if (prom_check(text, err, sizeof err) != 0)
        fail_msg("strict check: %s\n%s", err, text);
    char path[] = "/tmp/spool-metrics-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 '%s' '%s' >/dev/null", parse_script, path);
    int st = system(cmd);
    unlink(path);
    if (st != 0)
        fail_msg("the Python parser refused the text (status %d; 3: python3-prometheus-client "
                 "is missing, run ops/setup)\n%s",
                 st, text);
    return text;
}

/* The value of the sample line "prefix value", or NAN when there is none. */
static double value_of(const char *text, const char *prefix)
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
    return NAN;
}

#define assert_sample(text, prefix, want)                                                          \
    do {                                                                                           \
        double got_ = value_of(text, prefix);                                                      \
        if (!(got_ == (want)))                                                                     \
            fail_msg("%s: want %g, got %g", prefix, (double)(want), got_);                         \
    } while (0)

/* ---- Tests ------------------------------------------------------------------ */

static void families_exist_before_any_event(void **state)
{
    struct fixture *fx = *state;
    char *t = scrape(&fx->s);
    const char *families[] = {
        "spool_time_to_first_token_seconds histogram",
        "spool_time_per_output_token_seconds histogram",
        "spool_request_duration_seconds histogram",
        "spool_requests_total counter",
        "spool_tokens_total counter",
        "spool_preemptions_total counter",
        "spool_workers gauge",
        "spool_worker_running_sequences gauge",
        "spool_worker_queued_sequences gauge",
        "spool_worker_kv_blocks_used gauge",
        "spool_worker_kv_blocks_total gauge",
        "spool_worker_free_slots gauge",
        "spool_worker_max_batch gauge",
        "spool_worker_heartbeat_age_seconds gauge",
        "spool_scheduler_active gauge",
    };
    for (size_t i = 0; i < sizeof families / sizeof *families; i++) {
        char line[128];
        snprintf(line, sizeof line, "# TYPE %s\n", families[i]);
        if (!strstr(t, line))
            fail_msg("no %s in\n%s", line, t);
    }
    /* Every (state, capacity) pair is there, at 0. */
    assert_sample(t, "spool_workers{state=\"active\",capacity=\"spot\"}", 0);
    assert_sample(t, "spool_workers{state=\"silent\",capacity=\"on-demand\"}", 0);
    assert_sample(t, "spool_scheduler_active", 1);
    free(t);
    fx->s.active = false;
    t = scrape(&fx->s);
    assert_sample(t, "spool_scheduler_active", 0);
    free(t);
}

static void live_requests_are_counted(void **state)
{
    struct fixture *fx = *state;
    struct sched *s = &fx->s;
    sched_metrics_live_done(s, "m@1", 200, 0.03, 0.012, 0.5, 10, 20);
    sched_metrics_live_done(s, "m@1", 200, 0.07, -1, 0.2, 10, 20);
    sched_metrics_live_done(s, "m@1", 429, -1, -1, 0.001, 0, 0);
    sched_metrics_live_done(s, NULL, 404, -1, -1, 0.002, 0, 0);
    char *t = scrape(s);
    assert_sample(t, "spool_requests_total{lane=\"live\",model=\"m@1\",status=\"200\"}", 2);
    assert_sample(t, "spool_requests_total{lane=\"live\",model=\"m@1\",status=\"429\"}", 1);
    assert_sample(t, "spool_requests_total{lane=\"live\",model=\"\",status=\"404\"}", 1);
    assert_sample(t, "spool_time_to_first_token_seconds_count{lane=\"live\",model=\"m@1\"}", 2);
    assert_sample(
        t, "spool_time_to_first_token_seconds_bucket{lane=\"live\",model=\"m@1\",le=\"0.025\"}", 0);
    assert_sample(
        t, "spool_time_to_first_token_seconds_bucket{lane=\"live\",model=\"m@1\",le=\"0.05\"}", 1);
    assert_sample(
        t, "spool_time_to_first_token_seconds_bucket{lane=\"live\",model=\"m@1\",le=\"0.075\"}", 2);
    assert_sample(t, "spool_time_to_first_token_seconds_sum{lane=\"live\",model=\"m@1\"}",
                  0.03 + 0.07);
    assert_sample(t, "spool_time_per_output_token_seconds_count{lane=\"live\",model=\"m@1\"}", 1);
    assert_sample(t, "spool_request_duration_seconds_count{lane=\"live\",model=\"m@1\"}", 3);
    assert_sample(t, "spool_request_duration_seconds_count{lane=\"live\",model=\"\"}", 1);
    assert_sample(t, "spool_tokens_total{direction=\"in\",lane=\"live\",model=\"m@1\"}", 20);
    assert_sample(t, "spool_tokens_total{direction=\"out\",lane=\"live\",model=\"m@1\"}", 40);
    free(t);
}

static void batch_tokens_are_counted_once(void **state)
{
    struct fixture *fx = *state;
    struct sched *s = &fx->s;
    const char *out = "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"llama@3\"}";
    const char *in = "spool_tokens_total{direction=\"in\",lane=\"batch\",model=\"llama@3\"}";
    sched_metrics_shard_assigned(s, 7, 100, "llama", 3);
    sched_metrics_shard_progress(s, 7, 100, 5);
    char *t = scrape(s);
    assert_sample(t, out, 5);
    assert_true(isnan(value_of(t, in))); /* nothing in yet: no series */
    free(t);
    sched_metrics_shard_progress(s, 7, 100, 12);
    sched_metrics_shard_progress(s, 7, 100, 12); /* repeated: no change */
    sched_metrics_shard_progress(s, 7, 100, 9);  /* out of order: no change */
    sched_metrics_shard_usage(s, 7, 100, 40, 15);
    sched_metrics_shard_end(s, 7, 100, 3, 1);
    /* The same shard, assigned again to another worker, counts from zero there. */
    sched_metrics_shard_assigned(s, 9, 100, "llama", 3);
    sched_metrics_shard_progress(s, 9, 100, 2);
    /* A shard the scheduler did not assign (a failover): model "unknown". */
    sched_metrics_shard_progress(s, 8, 200, 4);
    sched_metrics_shard_usage(s, 8, 200, 6, 4);
    sched_metrics_shard_end(s, 8, 200, 2, 0);
    sched_metrics_shard_end(s, 9, 100, 0, 0); /* a RELEASE: nothing counted */
    sched_metrics_batch_tokens(s, "other@1", 1, 2);
    t = scrape(s);
    assert_sample(t, out, 15 + 2);
    assert_sample(t, in, 40);
    assert_sample(t, "spool_requests_total{lane=\"batch\",model=\"llama@3\",status=\"succeeded\"}",
                  3);
    assert_sample(t, "spool_requests_total{lane=\"batch\",model=\"llama@3\",status=\"failed\"}", 1);
    assert_sample(t, "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"unknown\"}", 4);
    assert_sample(t, "spool_tokens_total{direction=\"in\",lane=\"batch\",model=\"unknown\"}", 6);
    assert_sample(t, "spool_requests_total{lane=\"batch\",model=\"unknown\",status=\"succeeded\"}",
                  2);
    assert_sample(t, "spool_tokens_total{direction=\"in\",lane=\"batch\",model=\"other@1\"}", 1);
    assert_sample(t, "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"other@1\"}", 2);
    free(t);

    /* More shards than are remembered: the least recently used are forgotten. */
    for (uint64_t k = 1000; k < 1000 + 5000; k++)
        sched_metrics_shard_assigned(s, 1, k, "many", 1);
    sched_metrics_shard_progress(s, 1, 1000 + 4999, 3); /* recent: known */
    sched_metrics_shard_progress(s, 1, 1000, 7);        /* evicted: unknown */
    t = scrape(s);
    assert_sample(t, "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"many@1\"}", 3);
    assert_sample(t, "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"unknown\"}",
                  4 + 7);
    free(t);
}

static void preemptions_are_counted_by_source(void **state)
{
    struct fixture *fx = *state;
    sched_metrics_preemption(&fx->s, "spot notice");
    sched_metrics_preemption(&fx->s, "spot notice");
    sched_metrics_preemption(&fx->s, NULL);
    sched_metrics_preemption(&fx->s, "");
    char *t = scrape(&fx->s);
    assert_sample(t, "spool_preemptions_total{source=\"spot notice\"}", 2);
    assert_sample(t, "spool_preemptions_total{source=\"unknown\"}", 2);
    free(t);
}

static void add_worker(struct fixture *fx, struct sched_worker *w, const char *name,
                       enum sched_worker_state st, enum sp_wire_capacity cap)
{
    w->s = &fx->s;
    w->conn = (sp_wire_conn_t *)&fx->dummy_conn; /* only tested against NULL */
    w->state = st;
    w->capacity = cap;
    snprintf(w->name, sizeof w->name, "%s", name);
    /* s->workers is newest first: append, so the first added is the newest. */
    struct sched_worker **pp = &fx->s.workers;
    while (*pp)
        pp = &(*pp)->next;
    *pp = w;
}

static void worker_gauges_follow_heartbeats(void **state)
{
    struct fixture *fx = *state;
    struct sched *s = &fx->s;
    uv_update_time(s->loop);
    uint64_t now = uv_now(s->loop);
    struct sched_worker w[7];
    memset(w, 0, sizeof w);
    add_worker(fx, &w[0], "gpu-a", SW_ACTIVE, SP_WIRE_SPOT);
    w[0].running = 3;
    w[0].queued = 2;
    w[0].kv_blocks_total = 100;
    w[0].kv_blocks_free = 40;
    w[0].free_slots = 5;
    w[0].max_batch = 8;
    w[0].last_beat = now;
    add_worker(fx, &w[1], "gpu-b", SW_DRAINING, SP_WIRE_ON_DEMAND);
    w[1].last_beat = now;
    add_worker(fx, &w[2], "gpu-c", SW_ACTIVE, SP_WIRE_ON_DEMAND);
    w[2].last_beat = now > 10000 ? now - 10000 : 0; /* missed three heartbeats */
    w[2].max_batch = 4;
    add_worker(fx, &w[3], "gpu-d", SW_REGISTERING, SP_WIRE_SPOT);
    add_worker(fx, &w[4], "", SW_NEW, SP_WIRE_SPOT); /* not registered: not counted */
    add_worker(fx, &w[5], "gpu-e", SW_ACTIVE, SP_WIRE_SPOT);
    w[5].conn = NULL; /* closed: not counted */
    /* The old connection of a worker that reconnected (older, so later in the list). */
    add_worker(fx, &w[6], "gpu-a", SW_DRAINING, SP_WIRE_SPOT);
    w[6].running = 99;
    w[6].last_beat = now;

    char *t = scrape(s);
    assert_sample(t, "spool_workers{state=\"active\",capacity=\"spot\"}", 1);
    assert_sample(t, "spool_workers{state=\"draining\",capacity=\"on-demand\"}", 1);
    assert_sample(t, "spool_workers{state=\"draining\",capacity=\"spot\"}", 1);
    assert_sample(t, "spool_workers{state=\"silent\",capacity=\"on-demand\"}", 1);
    assert_sample(t, "spool_workers{state=\"registering\",capacity=\"spot\"}", 1);
    assert_sample(t, "spool_workers{state=\"active\",capacity=\"on-demand\"}", 0);
    assert_sample(t, "spool_worker_running_sequences{worker=\"gpu-a\"}", 3);
    assert_sample(t, "spool_worker_queued_sequences{worker=\"gpu-a\"}", 2);
    assert_sample(t, "spool_worker_kv_blocks_used{worker=\"gpu-a\"}", 60);
    assert_sample(t, "spool_worker_kv_blocks_total{worker=\"gpu-a\"}", 100);
    assert_sample(t, "spool_worker_free_slots{worker=\"gpu-a\"}", 5);
    assert_sample(t, "spool_worker_max_batch{worker=\"gpu-a\"}", 8);
    assert_true(value_of(t, "spool_worker_heartbeat_age_seconds{worker=\"gpu-a\"}") < 1);
    assert_true(value_of(t, "spool_worker_heartbeat_age_seconds{worker=\"gpu-c\"}") >= 3);
    assert_sample(t, "spool_worker_max_batch{worker=\"gpu-c\"}", 4);
    assert_sample(t, "spool_worker_running_sequences{worker=\"gpu-b\"}", 0);
    assert_true(isnan(value_of(t, "spool_worker_running_sequences{worker=\"gpu-d\"}")));
    assert_true(isnan(value_of(t, "spool_worker_running_sequences{worker=\"gpu-e\"}")));
    free(t);

    /* A new heartbeat, and gpu-b leaves: its series go. */
    w[0].running = 7;
    w[0].kv_blocks_free = 100;
    w[0].next = &w[2];
    t = scrape(s);
    assert_sample(t, "spool_worker_running_sequences{worker=\"gpu-a\"}", 7);
    assert_sample(t, "spool_worker_kv_blocks_used{worker=\"gpu-a\"}", 0);
    assert_true(isnan(value_of(t, "spool_worker_running_sequences{worker=\"gpu-b\"}")));
    assert_sample(t, "spool_workers{state=\"draining\",capacity=\"on-demand\"}", 0);
    free(t);
    s->workers = NULL;
}

static void handler_answers_with_the_text(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(sched_metrics_n_routes, 1);
    const struct sh_route *r = &sched_metrics_routes[0];
    assert_string_equal(r->method, "GET");
    assert_string_equal(r->pattern, "/metrics");
    assert_int_equal(r->needs, 0);
    sched_metrics_live_done(&fx->s, "m@2", 200, 0.01, 0.001, 0.05, 3, 4);
    struct sh_call c = {0};
    r->handle(&fx->s, &c);
    assert_int_equal(c.answers, 1);
    assert_int_equal(c.status, 200);
    assert_string_equal(c.content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_int_equal(strlen(c.body), c.len);
    char err[256];
    if (prom_check(c.body, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_sample(c.body, "spool_requests_total{lane=\"live\",model=\"m@2\",status=\"200\"}", 1);
    free(c.body);

    /* Before init (or after stop) the events do nothing and the route says 503. */
    struct sched bare = {.loop = fx->s.loop};
    sched_metrics_live_done(&bare, "m@2", 200, 0.01, 0.001, 0.05, 3, 4);
    sched_metrics_batch_tokens(&bare, "m@2", 1, 1);
    sched_metrics_preemption(&bare, "x");
    sched_metrics_shard_assigned(&bare, 1, 1, "m", 1);
    sched_metrics_shard_progress(&bare, 1, 1, 1);
    sched_metrics_shard_usage(&bare, 1, 1, 1, 1);
    sched_metrics_shard_end(&bare, 1, 1, 1, 1);
    sched_metrics_stop(&bare);
    struct sh_call c2 = {0};
    r->handle(&bare, &c2);
    assert_int_equal(c2.answers, 1);
    assert_int_equal(c2.status, 503);
    assert_string_equal(c2.content_type, "error:service_unavailable");
    free(c2.body);
}

static void model_label_sets_are_capped(void **state)
{
    struct fixture *fx = *state;
    char model[32];
    for (int i = 0; i < 2100; i++) {
        snprintf(model, sizeof model, "m%d@1", i);
        sched_metrics_live_done(&fx->s, model, 200, 0.01, -1, 0.1, 1, 1);
        sched_metrics_batch_tokens(&fx->s, model, 1, 1);
    }
    char *text;
    size_t len;
    assert_int_equal(sched_metrics_render(&fx->s, &text, &len), 0);
    /* Past each family's cap (1,000 models for tokens, 2,000 label sets for histograms) new label
     * sets are dropped; the others still count. */
    assert_sample(text, "spool_requests_total{lane=\"live\",model=\"m999@1\",status=\"200\"}", 1);
    assert_sample(text, "spool_time_to_first_token_seconds_count{lane=\"live\",model=\"m1999@1\"}",
                  1);
    assert_sample(text, "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"m999@1\"}", 1);
    assert_sample(text, "spool_requests_total{lane=\"live\",model=\"m2099@1\",status=\"200\"}", 1);
    assert_true(isnan(value_of(
        text, "spool_time_to_first_token_seconds_count{lane=\"live\",model=\"m2000@1\"}")));
    assert_true(isnan(
        value_of(text, "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"m1000@1\"}")));
    free(text);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s PROM_PARSE_PY\n", argv[0]);
        return 2;
    }
    parse_script = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(families_exist_before_any_event, setup, teardown),
        cmocka_unit_test_setup_teardown(live_requests_are_counted, setup, teardown),
        cmocka_unit_test_setup_teardown(batch_tokens_are_counted_once, setup, teardown),
        cmocka_unit_test_setup_teardown(preemptions_are_counted_by_source, setup, teardown),
        cmocka_unit_test_setup_teardown(worker_gauges_follow_heartbeats, setup, teardown),
        cmocka_unit_test_setup_teardown(handler_answers_with_the_text, setup, teardown),
        cmocka_unit_test_setup_teardown(model_label_sets_are_capped, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
