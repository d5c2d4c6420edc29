/*
 * spool-worker: hosts one engine on one GPU (or the CPU). This file holds the
 * process shell (configuration, signals, the libuv loop); the shard runner,
 * checkpoints and the preemption watch live in their own files as they arrive.
 */
#include "spool/log.h"
#include "spool/migrate.h"
#include "spool_config.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include <libpq-fe.h>

static const char usage[] =
    "usage: spool-worker [OPTIONS]\n\n"
    "A Spool worker: runs one engine and takes work from the scheduler.\n\n"
    "  --dsn DSN        PostgreSQL connection string (env SPOOL_DSN)\n"
    "  --scheduler ADDR scheduler address, host:port (env SPOOL_SCHEDULER,\n"
    "                   default 127.0.0.1:7470)\n"
    "  --log-level L    debug, info, warn, error (env SPOOL_LOG_LEVEL)\n"
    "  --log-json       log JSON lines (env SPOOL_LOG_FORMAT=json)\n"
    "  --version        print the version\n"
    "  --help           this text\n";

static void on_signal(uv_signal_t *h, int signum)
{
    sp_info("received %s; shutting down", strsignal(signum));
    uv_stop(h->loop);
}

static const char *env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    sp_log_init("worker");
    const char *dsn = env_or("SPOOL_DSN", NULL);
    const char *listen = env_or("SPOOL_SCHEDULER", "127.0.0.1:7470");
    static const struct option opts[] = {
        {"dsn", required_argument, NULL, 'd'},
        {"scheduler", required_argument, NULL, 'l'},
        {"log-level", required_argument, NULL, 'L'},
        {"log-json", no_argument, NULL, 'J'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'd':
            dsn = optarg;
            break;
        case 'l':
            listen = optarg;
            break;
        case 'L': {
            int l = sp_log_parse_level(optarg);
            if (l < 0) {
                fprintf(stderr, "usage error: unknown log level '%s'\n", optarg);
                return 2;
            }
            sp_log_set_level((enum sp_log_level)l);
            break;
        }
        case 'J':
            sp_log_set_json(true);
            break;
        case 'V':
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
    if (optind < argc) {
        fprintf(stderr, "usage error: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!dsn) {
        fprintf(stderr, "error: no database: pass --dsn or set SPOOL_DSN\n");
        return 2;
    }

    PGconn *conn = PQconnectdb(dsn);
    if (PQstatus(conn) != CONNECTION_OK) {
        sp_error("cannot connect to the database: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return 1;
    }
    PGresult *r = PQexec(conn, "SELECT spool.schema_version()");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        sp_error("the database has no Spool schema (run 'spool db migrate'): %s",
                 PQresultErrorMessage(r));
        PQclear(r);
        PQfinish(conn);
        return 1;
    }
    sp_info("connected; schema %s; scheduler at %s", PQgetvalue(r, 0, 0), listen);
    PQclear(r);
    PQfinish(conn);

    uv_loop_t *loop = uv_default_loop();
    uv_signal_t sigterm, sigint;
    uv_signal_init(loop, &sigterm);
    uv_signal_init(loop, &sigint);
    uv_signal_start(&sigterm, on_signal, SIGTERM);
    uv_signal_start(&sigint, on_signal, SIGINT);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&sigterm, NULL);
    uv_close((uv_handle_t *)&sigint, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    sp_info("stopped");
    return 0;
}
