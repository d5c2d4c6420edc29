/*
 * spool-scheduler: the batch lane's control plane. This file holds the
 * process shell: configuration, the libuv loop, signals and an orderly
 * shutdown. See scheduler.h for how the other files divide the work and
 * docs/architecture.md ("The scheduler") for the whole picture.
 *
 * Exit codes: 0 after SIGTERM/SIGINT; 1 when it cannot start (a DSN that
 * does not parse) or the database has no (or too old a) Spool schema; 2 for
 * a usage error. A database that cannot be reached is waited for.
 */
#include "scheduler.h"
#include "livelog.h"
#include "metrics.h"
#include "ratelimit.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "auth.h"
#include "http.h"
#include "live.h"
#include "spool/error.h"
#include "spool/log.h"
#include "spool_config.h"

static const char usage[] =
    "usage: spool-scheduler [OPTIONS]\n\n"
    "The Spool control plane: plans shards, places them on workers, keeps leases.\n"
    "Several may run against one database; one is active (it holds a PostgreSQL\n"
    "advisory lock and accepts workers), the others stand by and take over.\n\n"
    "  --dsn DSN            PostgreSQL connection string (env SPOOL_DSN)\n"
    "  --listen ADDR        worker protocol address, host:port; port 0 picks one\n"
    "                       (env SPOOL_LISTEN, default 127.0.0.1:7470)\n"
    "  --port-file PATH     while active, write the bound port there (removed on\n"
    "                       stepping down)\n"
    "  --http-listen ADDR   HTTP (OpenAI-compatible API, /healthz, /readyz) address,\n"
    "                       host:port; port 0 picks one; served active or standby\n"
    "                       (env SPOOL_HTTP_LISTEN, default 127.0.0.1:8080)\n"
    "  --http-port-file PATH  write the bound HTTP port there\n"
    "  --http-max-body N    request bodies larger than N bytes get 413 (default 100 MiB)\n"
    "  --request-timeout-ms N  a live request's whole time (default 600000)\n"
    "  --heartbeat-ms N     workers heartbeat this often (default 5000)\n"
    "  --lease-ttl-ms N     a lease not renewed for this long expires (default 30000)\n"
    "  --sweep-ms N         expire, plan and place this often (default 1000)\n"
    "  --lock-retry-ms N    a standby tries the lock this often (default 500)\n"
    "  --shard-size N       requests per shard (default 64)\n"
    "  --fill K             keep K x max_batch requests leased per worker (default 2)\n"
    "  --log-level L        debug, info, warn, error (env SPOOL_LOG_LEVEL)\n"
    "  --log-json           log JSON lines (env SPOOL_LOG_FORMAT=json)\n"
    "  --version            print the version\n"
    "  --help               this text\n";

static struct sched sched;

void sched_shutdown(struct sched *s, int exit_code)
{
    if (s->stopping)
        return;
    s->stopping = true;
    s->exit_code = exit_code;
    sched_live_stop(s);
    sh_server_stop(s);
    sched_auth_stop(s);
    sched_sweep_stop(s);
    sched_livelog_stop(s);
    sched_rate_stop(s);
    sched_leader_stop(s);
    sched_db_close(s);
    if (s->batchdb)
        sp_pgconn_close(s->batchdb, NULL, NULL);
    s->batchdb = NULL;
    uv_close((uv_handle_t *)&s->sigs[0], NULL);
    uv_close((uv_handle_t *)&s->sigs[1], NULL);
}

static void on_signal(uv_signal_t *h, int signum)
{
    sp_info("received %s; shutting down", strsignal(signum));
    sched_shutdown(h->data, 0);
}

static const char *env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return v && *v ? v : dflt;
}

/* Parses a positive integer flag into *out; returns false with a message. */
static bool parse_uint(const char *flag, const char *v, unsigned min, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long n = strtoul(v, &end, 10);
    if (errno || *v == '\0' || *end != '\0' || n < min || n > INT_MAX) {
        fprintf(stderr, "usage error: %s needs an integer >= %u, got '%s'\n", flag, min, v);
        return false;
    }
    *out = (unsigned)n;
    return true;
}

/* Splits host:port ([v6]:port too) for flag into host and port; returns false with a message. */
static bool parse_addr(const char *flag, const char *v, char *host, size_t hostcap, int *port_out)
{
    const char *colon = strrchr(v, ':');
    unsigned port;
    if (!colon || colon == v || !parse_uint(flag, colon + 1, 0, &port) || port > 65535) {
        fprintf(stderr, "usage error: %s wants host:port (0..65535), got '%s'\n", flag, v);
        return false;
    }
    const char *h = v;
    size_t hl = (size_t)(colon - v);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl >= hostcap) {
        fprintf(stderr, "usage error: %s host is too long\n", flag);
        return false;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port_out = (int)port;
    struct sockaddr_in6 a6;
    struct sockaddr_in a4;
    if (uv_ip4_addr(host, 0, &a4) != 0 && uv_ip6_addr(host, 0, &a6) != 0) {
        fprintf(stderr, "usage error: %s host '%s' is not an IP address (names are not resolved)\n",
                flag, host);
        return false;
    }
    return true;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    sp_log_init("scheduler");
    struct sched *s = &sched;
    struct sched_config *cfg = &s->cfg;
    *cfg = (struct sched_config){
        .dsn = env_or("SPOOL_DSN", NULL),
        .heartbeat_ms = 5000,
        .lease_ttl_ms = 30000,
        .sweep_ms = 1000,
        .lock_retry_ms = 500,
        .shard_size = 64,
        .fill = 2,
        .max_candidates = 512,
    };
    const char *listen = env_or("SPOOL_LISTEN", "127.0.0.1:7470");
    const char *http_listen = env_or("SPOOL_HTTP_LISTEN", "127.0.0.1:8080");
    struct sh_config hcfg = {.port = 8080};
    unsigned max_body = 100u << 20, req_timeout = 600000;
    enum {
        O_PORT_FILE = 256,
        O_HB,
        O_TTL,
        O_SWEEP,
        O_LOCK,
        O_SHARD,
        O_FILL,
        O_HTTP,
        O_HTTP_PORT_FILE,
        O_MAX_BODY,
        O_REQ_TIMEOUT
    };
    static const struct option opts[] = {
        {"dsn", required_argument, NULL, 'd'},
        {"listen", required_argument, NULL, 'l'},
        {"port-file", required_argument, NULL, O_PORT_FILE},
        {"heartbeat-ms", required_argument, NULL, O_HB},
        {"lease-ttl-ms", required_argument, NULL, O_TTL},
        {"sweep-ms", required_argument, NULL, O_SWEEP},
        {"lock-retry-ms", required_argument, NULL, O_LOCK},
        {"shard-size", required_argument, NULL, O_SHARD},
        {"fill", required_argument, NULL, O_FILL},
        {"http-listen", required_argument, NULL, O_HTTP},
        {"http-port-file", required_argument, NULL, O_HTTP_PORT_FILE},
        {"http-max-body", required_argument, NULL, O_MAX_BODY},
        {"request-timeout-ms", required_argument, NULL, O_REQ_TIMEOUT},
        {"log-level", required_argument, NULL, 'L'},
        {"log-json", no_argument, NULL, 'J'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    unsigned shard_size = 64;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        bool ok = true;
        switch (ch) {
        case 'd':
            cfg->dsn = optarg;
            break;
        case 'l':
            listen = optarg;
            break;
        case O_PORT_FILE:
            cfg->port_file = optarg;
            break;
        case O_HB:
            ok = parse_uint("--heartbeat-ms", optarg, 10, &cfg->heartbeat_ms);
            break;
        case O_TTL:
            ok = parse_uint("--lease-ttl-ms", optarg, 100, &cfg->lease_ttl_ms);
            break;
        case O_SWEEP:
            ok = parse_uint("--sweep-ms", optarg, 10, &cfg->sweep_ms);
            break;
        case O_LOCK:
            ok = parse_uint("--lock-retry-ms", optarg, 10, &cfg->lock_retry_ms);
            break;
        case O_SHARD:
            ok = parse_uint("--shard-size", optarg, 1, &shard_size);
            break;
        case O_FILL:
            ok = parse_uint("--fill", optarg, 1, &cfg->fill);
            break;
        case O_HTTP:
            http_listen = optarg;
            break;
        case O_HTTP_PORT_FILE:
            hcfg.port_file = optarg;
            break;
        case O_MAX_BODY:
            ok = parse_uint("--http-max-body", optarg, 1, &max_body);
            break;
        case O_REQ_TIMEOUT:
            ok = parse_uint("--request-timeout-ms", optarg, 1, &req_timeout);
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
            printf("spool-scheduler %s\n", SPOOL_VERSION);
            return 0;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            fputs(usage, stderr);
            return 2;
        }
        if (!ok)
            return 2;
    }
    cfg->shard_size = (int)shard_size;
    if (optind < argc) {
        fprintf(stderr, "usage error: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!cfg->dsn) {
        fprintf(stderr, "error: no database: pass --dsn or set SPOOL_DSN\n");
        return 2;
    }
    if (!parse_addr("--listen", listen, cfg->listen_host, sizeof cfg->listen_host,
                    &cfg->listen_port) ||
        !parse_addr("--http-listen", http_listen, hcfg.host, sizeof hcfg.host, &hcfg.port))
        return 2;
    hcfg.max_body = max_body;
    hcfg.request_timeout_ms = req_timeout;
    if (cfg->heartbeat_ms >= cfg->lease_ttl_ms)
        sp_warn("--heartbeat-ms %u is not below --lease-ttl-ms %u: leases will expire between "
                "heartbeats",
                cfg->heartbeat_ms, cfg->lease_ttl_ms);
    snprintf(s->ttl_interval, sizeof s->ttl_interval, "%u milliseconds", cfg->lease_ttl_ms);

    s->loop = uv_default_loop();
    int rc;
    /* The Batch API's connection: queued queries wait for it like the work connection's. */
    struct sp_pgconn_opts bo = {
        .backoff_base_ms = 100, .backoff_cap_ms = 1000, .connect_timeout_ms = 5000};
    if ((rc = sched_metrics_init(s)) != 0 || (rc = sched_db_open(s)) != 0 ||
        (rc = sp_pgconn_open(s->loop, cfg->dsn, &bo, &s->batchdb)) != 0 ||
        (rc = sched_leader_start(s)) != 0 || (rc = sched_sweep_init(s)) != 0 ||
        (rc = sched_livelog_init(s, NULL)) != 0) {
        sp_error("cannot start: %s (check --dsn)", sp_strerror(rc));
        return 1;
    }
    if ((rc = sched_auth_init(s)) != 0 || (rc = sh_server_start(s, &hcfg)) != 0) {
        sp_error("cannot start the HTTP server on %s: %s (check --http-listen)", http_listen,
                 sp_strerror(rc));
        return 1;
    }
    for (int i = 0; i < 2; i++) {
        uv_signal_init(s->loop, &s->sigs[i]);
        s->sigs[i].data = s;
    }
    uv_signal_start(&s->sigs[0], on_signal, SIGTERM);
    uv_signal_start(&s->sigs[1], on_signal, SIGINT);
    sp_info("standing by for the scheduler lock; worker protocol on %s:%d when active",
            cfg->listen_host, cfg->listen_port);
    uv_run(s->loop, UV_RUN_DEFAULT);
    uv_run(s->loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(s->loop);
    if (rc)
        sp_warn("loop closed with handles open: %s", uv_strerror(rc));
    sched_metrics_stop(s);
    sp_info("stopped");
    return s->exit_code;
}
