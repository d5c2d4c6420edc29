/*
 * GET /metrics (metrics.h): the route table the HTTP front serves; the
 * text comes from sched_metrics_render. Kept apart from metrics.c so that
 * the metrics themselves do not depend on the HTTP server.
 */
#include "metrics.h"

#include <stdlib.h>

#include "spool/error.h"

#define CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

static void handle_metrics(struct sched *s, sh_call_t *c)
{
    char *text;
    size_t len;
    int rc = sched_metrics_render(s, &text, &len);
    if (rc) {
        sh_respond_error(c, rc == SP_ESTATE ? 503 : 500,
                         rc == SP_ESTATE ? "service_unavailable" : "server_error", NULL, NULL,
                         "metrics are not available: %s", sp_strerror(rc));
        return;
    }
    sh_respond_raw(c, 200, CONTENT_TYPE, text, len);
    free(text);
}

const struct sh_route sched_metrics_routes[] = {
    {"GET", "/metrics", 0, handle_metrics},
};
const int sched_metrics_n_routes = sizeof sched_metrics_routes / sizeof *sched_metrics_routes;
