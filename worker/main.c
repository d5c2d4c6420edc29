/*
 * spool-worker: hosts one engine on one GPU (or the CPU) and runs the batch
 * shards the scheduler assigns it, and the live requests it routes to it
 * (for the model named by --model). This file holds the process shell:
 * configuration, start-up checks, the libuv loop and the exit code. See
 * worker.h for the other files.
 *
 * Exit codes: 0 after a clean stop (a drain on a notice, SIGTERM or SIGINT);
 * 1 when start-up fails (database, model store) or the drain deadline
 * passes; 2 for a usage error.
 */
#include "worker.h"

#include "spool/log.h"
#include "spool_config.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage[] =
    "usage: spool-worker [OPTIONS]\n\n"
    "A Spool worker: runs one engine and takes batch shards and live requests from the\n"
    "scheduler.\n\n"
    "  --dsn DSN               PostgreSQL connection string (env SPOOL_DSN)\n"
    "  --scheduler HOST:PORT   scheduler address (env SPOOL_SCHEDULER, default 127.0.0.1:7470)\n"
    "  --name NAME             worker name, unique in the fleet (default: the host name)\n"
    "  --gpu-type TYPE         GPU model for placement and reports (default cpu)\n"
    "  --capacity C            spot or on-demand (default on-demand)\n"
    "  --price-per-hour USD    what this worker costs per hour (default 0)\n"
    "  --model-store LOC       model store directory or file:// URI (env SPOOL_MODEL_STORE)\n"
    "  --model-cache DIR       local cache of unpacked models (env SPOOL_MODEL_CACHE,\n"
    "                          default ./.spool/cache)\n"
    "  --model-cache-limit N   cache size limit in bytes (K, M, G suffixes; default none)\n"
    "  --model REF             load this model version at start-up and serve live requests\n"
    "                          for it: NAME (its prod alias, else the newest version),\n"
    "                          NAME@ALIAS, NAME@VERSION or NAME@sha256:HEX; the worker\n"
    "                          then runs no other model (batch shards of others are released)\n"
    "  --max-batch N           sequences the engine runs at once (default 32)\n"
    "  --kv-memory N           KV cache bytes (K, M, G suffixes; default: the engine's)\n"
    "  --threads N             CPU threads (default: all cores)\n"
    "  --backend B             engine backend: cpu (default), or null (no arithmetic)\n"
    "  --checkpoint-tokens N   checkpoint a generation every N tokens (default 64)\n"
    "  --checkpoint-seconds T  and every T seconds (default 10; 0 = off)\n"
    "  --preempt-notice SRC    a preemption notice source, repeatable: file:PATH,\n"
    "                          aws:BASE_URL, gcp:BASE_URL (SIGTERM always is one)\n"
    "  --drain-deadline T      seconds to checkpoint and release everything on a notice\n"
    "                          (default 25)\n"
    "  --log-level L           debug, info, warn, error (env SPOOL_LOG_LEVEL)\n"
    "  --log-json              log JSON lines (env SPOOL_LOG_FORMAT=json)\n"
    "  --version               print the version\n"
    "  --help                  this text\n";

static const char *env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

/* Parses a number in [lo, hi]; with sizes, a K/M/G suffix (powers of 1024). */
static int parse_num(const char *s, double lo, double hi, bool size, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s)
        return -1;
    if (size && *end) {
        const char *u = "KMGT";
        const char *p = strchr(u, *end);
        if (!p || end[1])
            return -1;
        for (const char *q = u; q <= p; q++)
            v *= 1024;
        end++;
    }
    if (*end || !(v >= lo && v <= hi))
        return -1;
    *out = v;
    return 0;
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "usage error: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n(spool-worker --help lists the options)\n");
    return 2;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    sp_log_init("worker");
    static struct worker w;
    struct wk_config *c = &w.cfg;
    static char hostname[256];
    if (gethostname(hostname, sizeof(hostname) - 1))
        snprintf(hostname, sizeof(hostname), "worker-%d", (int)getpid());
    c->dsn = env_or("SPOOL_DSN", NULL);
    c->scheduler = env_or("SPOOL_SCHEDULER", "127.0.0.1:7470");
    c->name = hostname;
    c->gpu_type = "cpu";
    c->capacity = SP_WIRE_ON_DEMAND;
    c->model_store = NULL;
    c->model_cache = env_or("SPOOL_MODEL_CACHE", "./.spool/cache");
    c->max_batch = 32;
    c->backend = "cpu";
    c->checkpoint_tokens = 64;
    c->checkpoint_seconds = 10;
    c->drain_deadline = 25;
    c->step_delay_ms = atoi(env_or("SPOOL_WORKER_STEP_DELAY_MS", "0"));

    enum {
        O_DSN = 256,
        O_SCHED,
        O_NAME,
        O_GPU,
        O_CAP,
        O_PRICE,
        O_STORE,
        O_CACHE,
        O_CACHE_LIMIT,
        O_MODEL,
        O_BATCH,
        O_KV,
        O_THREADS,
        O_BACKEND,
        O_CKT,
        O_CKS,
        O_NOTICE,
        O_DRAIN,
        O_LOGL,
        O_LOGJ,
        O_VERSION
    };
    static const struct option opts[] = {
        {"dsn", required_argument, NULL, O_DSN},
        {"scheduler", required_argument, NULL, O_SCHED},
        {"name", required_argument, NULL, O_NAME},
        {"gpu-type", required_argument, NULL, O_GPU},
        {"capacity", required_argument, NULL, O_CAP},
        {"price-per-hour", required_argument, NULL, O_PRICE},
        {"model-store", required_argument, NULL, O_STORE},
        {"model-cache", required_argument, NULL, O_CACHE},
        {"model-cache-limit", required_argument, NULL, O_CACHE_LIMIT},
        {"model", required_argument, NULL, O_MODEL},
        {"max-batch", required_argument, NULL, O_BATCH},
        {"kv-memory", required_argument, NULL, O_KV},
        {"threads", required_argument, NULL, O_THREADS},
        {"backend", required_argument, NULL, O_BACKEND},
        {"checkpoint-tokens", required_argument, NULL, O_CKT},
        {"checkpoint-seconds", required_argument, NULL, O_CKS},
        {"preempt-notice", required_argument, NULL, O_NOTICE},
        {"drain-deadline", required_argument, NULL, O_DRAIN},
        {"log-level", required_argument, NULL, O_LOGL},
        {"log-json", no_argument, NULL, O_LOGJ},
        {"version", no_argument, NULL, O_VERSION},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    double v;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case O_DSN:
            c->dsn = optarg;
            break;
        case O_SCHED:
            if (!strrchr(optarg, ':'))
                return usage_error("--scheduler '%s' must be HOST:PORT", optarg);
            c->scheduler = optarg;
            break;
        case O_NAME:
            if (!*optarg)
                return usage_error("--name must not be empty");
            c->name = optarg;
            break;
        case O_GPU:
            c->gpu_type = optarg;
            break;
        case O_CAP:
            if (strcmp(optarg, "spot") == 0)
                c->capacity = SP_WIRE_SPOT;
            else if (strcmp(optarg, "on-demand") == 0)
                c->capacity = SP_WIRE_ON_DEMAND;
            else
                return usage_error("--capacity must be spot or on-demand, got '%s'", optarg);
            break;
        case O_PRICE:
            if (parse_num(optarg, 0, 1e6, false, &v))
                return usage_error("--price-per-hour must be a number >= 0, got '%s'", optarg);
            c->price_per_hour = v;
            break;
        case O_STORE:
            c->model_store = optarg;
            break;
        case O_CACHE:
            c->model_cache = optarg;
            break;
        case O_CACHE_LIMIT:
            if (parse_num(optarg, 0, 1e18, true, &v))
                return usage_error("--model-cache-limit must be a size in bytes, got '%s'", optarg);
            c->model_cache_limit = (uint64_t)v;
            break;
        case O_MODEL:
            if (!*optarg || *optarg == '@')
                return usage_error("--model '%s' must be NAME, NAME@ALIAS, NAME@VERSION or "
                                   "NAME@sha256:HEX",
                                   optarg);
            c->model_ref = optarg;
            break;
        case O_BATCH:
            if (parse_num(optarg, 1, 4096, false, &v) || v != (int)v)
                return usage_error("--max-batch must be an integer in [1, 4096], got '%s'", optarg);
            c->max_batch = (int)v;
            break;
        case O_KV:
            if (parse_num(optarg, 1 << 20, 1e15, true, &v))
                return usage_error("--kv-memory must be a size of at least 1M, got '%s'", optarg);
            c->kv_bytes = (size_t)v;
            break;
        case O_THREADS:
            if (parse_num(optarg, 1, 1024, false, &v) || v != (int)v)
                return usage_error("--threads must be an integer in [1, 1024], got '%s'", optarg);
            c->threads = (int)v;
            break;
        case O_BACKEND:
            /* "null" is the engine's backend without arithmetic, for measuring
             * the queue (tests/bench/queue). */
            if (strcmp(optarg, "cpu") != 0 && strcmp(optarg, "null") != 0)
                return usage_error("--backend '%s': the worker runs the cpu or null backend only "
                                   "so far",
                                   optarg);
            c->backend = optarg;
            break;
        case O_CKT:
            if (parse_num(optarg, 1, 1 << 24, false, &v) || v != (int)v)
                return usage_error("--checkpoint-tokens must be a positive integer, got '%s'",
                                   optarg);
            c->checkpoint_tokens = (int)v;
            break;
        case O_CKS:
            if (parse_num(optarg, 0, 86400, false, &v))
                return usage_error("--checkpoint-seconds must be in [0, 86400], got '%s'", optarg);
            c->checkpoint_seconds = v;
            break;
        case O_NOTICE: {
            if (c->n_notices == WK_MAX_NOTICES)
                return usage_error("at most %d --preempt-notice sources", WK_MAX_NOTICES);
            struct wk_notice *n = &c->notices[c->n_notices];
            if (strncmp(optarg, "file:", 5) == 0 && optarg[5]) {
                n->kind = WK_NOTICE_FILE;
                n->arg = optarg + 5;
            } else if (strncmp(optarg, "aws:http://", 11) == 0) {
                n->kind = WK_NOTICE_AWS;
                n->arg = optarg + 4;
            } else if (strncmp(optarg, "gcp:http://", 11) == 0) {
                n->kind = WK_NOTICE_GCP;
                n->arg = optarg + 4;
            } else {
                return usage_error(
                    "--preempt-notice '%s' must be file:PATH, aws:http://HOST[:PORT] "
                    "or gcp:http://HOST[:PORT]",
                    optarg);
            }
            c->n_notices++;
            break;
        }
        case O_DRAIN:
            if (parse_num(optarg, 1, 3600, false, &v))
                return usage_error("--drain-deadline must be seconds in [1, 3600], got '%s'",
                                   optarg);
            c->drain_deadline = v;
            break;
        case O_LOGL: {
            int l = sp_log_parse_level(optarg);
            if (l < 0)
                return usage_error("unknown log level '%s'", optarg);
            sp_log_set_level((enum sp_log_level)l);
            break;
        }
        case O_LOGJ:
            sp_log_set_json(true);
            break;
        case O_VERSION:
            printf("spool-worker %s\n", SPOOL_VERSION);
            return 0;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            fputs(usage, stderr);
            return 2;
        }
    }
    if (optind < argc)
        return usage_error("unexpected argument '%s'", argv[optind]);
    if (!c->dsn) {
        fprintf(stderr, "error: no database: pass --dsn or set SPOOL_DSN\n");
        return 2;
    }

    char err[1024];
    if (wk_db_connect(&w, err, sizeof(err))) {
        sp_error("cannot connect to the database: %s", err);
        return 1;
    }
    PGresult *r = PQexec(w.db, "SELECT spool.schema_version()");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        sp_error("the database has no Spool schema (run 'spool db migrate'): %s",
                 PQresultErrorMessage(r));
        PQclear(r);
        PQfinish(w.db);
        return 1;
    }
    PQclear(r);
    if (sp_store_open(c->model_store, &w.store, err, sizeof(err))) {
        sp_error("cannot open the model store: %s", err);
        PQfinish(w.db);
        return 1;
    }
    if (c->model_ref && wk_live_load(&w, err, sizeof(err))) {
        sp_error("cannot load the live model: %s", err);
        wk_model_unload(&w);
        sp_store_close(&w.store);
        PQfinish(w.db);
        return 1;
    }
    sp_info("worker %s starting: scheduler %s, %s capacity, batch %d, checkpoints every %d tokens "
            "/ %g s",
            c->name, c->scheduler, sp_wire_capacity_name(c->capacity), c->max_batch,
            c->checkpoint_tokens, c->checkpoint_seconds);

    w.loop = uv_default_loop();
    if (wk_db_start(&w)) {
        wk_model_unload(&w);
        sp_store_close(&w.store);
        PQfinish(w.db);
        return 1;
    }
    wk_shards_start(&w);
    wk_preempt_start(&w);
    wk_conn_start(&w);
    uv_run(w.loop, UV_RUN_DEFAULT);
    wk_db_stop(&w);
    uv_loop_close(w.loop);
    wk_model_unload(&w);
    sp_store_close(&w.store);
    alarm(0);
    sp_info("stopped");
    return w.exit_code;
}
