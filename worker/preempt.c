/*
 * Preemption: notice sources and the drain.
 *
 * Sources: SIGTERM (Kubernetes, spot reclaim through the kubelet), a notice
 * file appearing
 * (--preempt-notice file:PATH, checked every 250 ms), and the cloud metadata
 * endpoints, polled every second: AWS BASE/latest/meta-data/spot/instance-action
 * (404 = no notice, 200 = notice) and GCP BASE/computeMetadata/v1/instance/preempted
 * (body TRUE = notice; header Metadata-Flavor: Google).
 *
 * On a notice the worker stops taking work, sends DRAIN to the scheduler,
 * writes the results it has, checkpoints every in-flight sequence, releases
 * every shard (spool.release_shard), records the preemption
 * (spool.record_preemption: source, sequences, tokens that could not be
 * saved), says GOODBYE and exits 0. SIGINT (an operator) drains the same way
 * without the DRAIN frame and the preemption row. A DRAIN from the scheduler
 * releases the shards but keeps the worker up (wk_drain_shards). --drain-deadline bounds all of it:
 * past it, SIGALRM ends the process with status 1 (the shards' leases then expire and their last
 * periodic checkpoints are resumed).
 */
#include "worker.h"

#include "spool/error.h"
#include "spool/log.h"

#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NOTICE_TICK_MS 250
#define HTTP_EVERY     4 /* ticks between metadata polls */

static unsigned ticks;

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] =
        "spool-worker: drain deadline passed; exiting without a clean drain\n";
    ssize_t n = write(2, msg, sizeof(msg) - 1);
    (void)n;
    _exit(1);
}

static void stop_all(struct worker *w)
{
    if (w->stopping)
        return;
    w->stopping = true;
    wk_conn_close(w);
    wk_db_settle(w); /* nothing is in flight after a drain; this is for any other stop */
    wk_db_close(w);
    wk_shards_stop(w);
    wk_preempt_stop(w);
}

static void on_bye(uv_timer_t *t)
{
    stop_all(t->data);
}

void wk_drain_shards(struct worker *w, const char *reason)
{
    if (w->exiting)
        return;
    w->draining = true;
    int seqs, shards;
    long lost;
    /* Stepping goes on: it collects the events of the sequences cancelled here. */
    wk_shards_release_all(w, "draining", &seqs, &lost, &shards);
    sp_info("the scheduler asked to drain (%s): %d shards released, %d sequences checkpointed, "
            "%ld tokens unsaved; waiting for work after the next registration",
            reason, shards, seqs, lost);
}

void wk_drain(struct worker *w, const char *source, bool preempted)
{
    if (w->exiting)
        return;
    w->exiting = true;
    w->draining = true;
    unsigned deadline_ms = (unsigned)(w->cfg.drain_deadline * 1000);
    signal(SIGALRM, on_alarm);
    alarm((unsigned)ceil(w->cfg.drain_deadline));
    sp_info("draining (%s): checkpointing and releasing every shard within %u ms", source,
            deadline_ms);
    uv_timer_stop(&w->step_timer);
    uv_idle_stop(&w->step_idle);
    w->stepping = false;
    w->ckpt_wait = false;
    /* Live requests cannot be handed over mid-stream: they end now, with finish_reason error. */
    wk_live_end_all(w, "error", preempted ? "the worker is preempted" : "the worker is stopping");
    if (preempted) {
        struct sp_wire_frame f = {.type = SP_WIRE_DRAIN,
                                  .drain = {.reason = "spot notice", .deadline_ms = deadline_ms}};
        wk_conn_send(w, &f);
    }
    int seqs, shards;
    long lost;
    wk_shards_release_all(w, preempted ? "preempted" : "draining", &seqs, &lost, &shards);
    if (preempted && w->has_id) {
        char a[24], b[16], c[16], d[24];
        snprintf(a, sizeof(a), "%" PRIu64, w->worker_id);
        snprintf(b, sizeof(b), "%d", shards);
        snprintf(c, sizeof(c), "%d", seqs);
        snprintf(d, sizeof(d), "%ld", lost);
        const char *p[5] = {a, source, b, c, d};
        char err[512];
        if (wk_db_call(w, "SELECT spool.record_preemption($1, $2, $3, $4, $5)", 5, p, NULL, err,
                       sizeof(err)))
            sp_warn("cannot record the preemption: %s", err);
    } else if (preempted) {
        sp_warn("never registered with the scheduler: the preemption is not recorded");
    }
    sp_info("drained: %d shards released, %d sequences checkpointed, %ld tokens unsaved", shards,
            seqs, lost);
    wk_conn_goodbye(w, preempted ? "preempted" : "drained");
    /* Give GOODBYE a moment to reach the scheduler, then close everything. */
    uv_timer_start(&w->exit_timer, on_bye, 200, 0);
}

void wk_preempt_notice(struct worker *w, const char *source)
{
    if (w->exiting)
        return;
    sp_warn("preemption notice from %s", source);
    wk_drain(w, source, true);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct worker *w = h->data;
    if (w->exiting)
        return;
    if (signum == SIGTERM) {
        wk_preempt_notice(w, "sigterm");
    } else {
        sp_info("interrupted: draining");
        wk_drain(w, "sigint", false);
    }
}

static void on_http(void *arg, int status, const char *body, size_t len)
{
    struct wk_notice *n = arg;
    n->in_flight = false;
    if (n->w->exiting || n->w->stopping)
        return;
    if (status < 0) {
        sp_debug("metadata poll %s failed: %s", n->arg, sp_strerror(status));
        return;
    }
    if (n->kind == WK_NOTICE_AWS && status == 200) {
        wk_preempt_notice(n->w, "aws");
    } else if (n->kind == WK_NOTICE_GCP && status == 200) {
        while (len && (body[len - 1] == '\n' || body[len - 1] == '\r' || body[len - 1] == ' '))
            len--;
        if (len == 4 && strncmp(body, "TRUE", 4) == 0)
            wk_preempt_notice(n->w, "gcp");
    }
}

static void on_tick(uv_timer_t *t)
{
    struct worker *w = t->data;
    ticks++;
    for (int i = 0; i < w->cfg.n_notices && !w->exiting; i++) {
        struct wk_notice *n = &w->cfg.notices[i];
        if (n->kind == WK_NOTICE_FILE) {
            struct stat st;
            if (stat(n->arg, &st) == 0)
                wk_preempt_notice(w, "notice-file");
            continue;
        }
        if (n->in_flight || (ticks - 1) % HTTP_EVERY != 0)
            continue;
        const char *path = n->kind == WK_NOTICE_AWS ? "/latest/meta-data/spot/instance-action"
                                                    : "/computeMetadata/v1/instance/preempted";
        const char *hdr = n->kind == WK_NOTICE_GCP ? "Metadata-Flavor: Google\r\n" : NULL;
        n->w = w;
        if (wk_http_get(w->loop, n->arg, path, hdr, 2000, on_http, n) == 0)
            n->in_flight = true;
    }
}

void wk_preempt_start(struct worker *w)
{
    uv_signal_init(w->loop, &w->sigterm);
    uv_signal_init(w->loop, &w->sigint);
    w->sigterm.data = w->sigint.data = w;
    uv_signal_start(&w->sigterm, on_signal, SIGTERM);
    uv_signal_start(&w->sigint, on_signal, SIGINT);
    uv_timer_init(w->loop, &w->notice_timer);
    uv_timer_init(w->loop, &w->exit_timer);
    w->notice_timer.data = w->exit_timer.data = w;
    if (w->cfg.n_notices)
        uv_timer_start(&w->notice_timer, on_tick, 0, NOTICE_TICK_MS);
}

void wk_preempt_stop(struct worker *w)
{
    uv_close((uv_handle_t *)&w->sigterm, NULL);
    uv_close((uv_handle_t *)&w->sigint, NULL);
    uv_close((uv_handle_t *)&w->notice_timer, NULL);
    uv_close((uv_handle_t *)&w->exit_timer, NULL);
}
