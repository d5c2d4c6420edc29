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
#include "metrics.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

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
    sched_sweep_stop(s);
    sched_leader_stop(s);
    sched_db_close(s);
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

/* Splits host:port ([v6]:port too) into cfg; returns false with a message. */
static bool parse_listen(const char *v, struct sched_config *cfg)
{
    const char *colon = strrchr(v, ':');
    unsigned port;
    if (!colon || colon == v || !parse_uint("--listen port", colon + 1, 0, &port) || port > 65535) {
        fprintf(stderr, "usage error: --listen wants host:port (0..65535), got '%s'\n", v);
        return false;
    }
    const char *h = v;
    size_t hl = (size_t)(colon - v);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl >= sizeof cfg->listen_host) {
        fprintf(stderr, "usage error: --listen host is too long\n");
        return false;
    }
    memcpy(cfg->listen_host, h, hl);
    cfg->listen_host[hl] = '\0';
    cfg->listen_port = (int)port;
    struct sockaddr_in6 a6;
    struct sockaddr_in a4;
    if (uv_ip4_addr(cfg->listen_host, 0, &a4) != 0 && uv_ip6_addr(cfg->listen_host, 0, &a6) != 0) {
        fprintf(stderr,
                "usage error: --listen host '%s' is not an IP address (names are not resolved)\n",
                cfg->listen_host);
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
    enum { O_PORT_FILE = 256, O_HB, O_TTL, O_SWEEP, O_LOCK, O_SHARD, O_FILL };
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
    if (!parse_listen(listen, cfg))
        return 2;
    if (cfg->heartbeat_ms >= cfg->lease_ttl_ms)
        sp_warn("--heartbeat-ms %u is not below --lease-ttl-ms %u: leases will expire between "
                "heartbeats",
                cfg->heartbeat_ms, cfg->lease_ttl_ms);
    snprintf(s->ttl_interval, sizeof s->ttl_interval, "%u milliseconds", cfg->lease_ttl_ms);

    s->loop = uv_default_loop();
    int rc;
    if ((rc = sched_metrics_init(s)) != 0 || (rc = sched_db_open(s)) != 0 ||
        (rc = sched_leader_start(s)) != 0 || (rc = sched_sweep_init(s)) != 0) {
        sp_error("cannot start: %s (check --dsn)", sp_strerror(rc));
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
