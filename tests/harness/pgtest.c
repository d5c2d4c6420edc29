#include "pgtest.h"

#include "spool/migrate.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what, const char *detail)
{
    fprintf(stderr, "pgtest: %s: %s\n", what, detail ? detail : "");
    abort();
}

/* The reaper: waits for the test to go away, then cleans up after it. */
static void reaper_main(struct pgt *t, int rfd)
{
    setsid();
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    char c;
    while (read(rfd, &c, 1) < 0 && errno == EINTR)
        ;
    /* EOF: the test closed the pipe, by pgt_stop or by dying. */
    if (sp_cluster_pid(&t->cluster) > 0)
        sp_cluster_stop(&t->cluster, true);
    sp_cluster_remove(&t->cluster);
    _exit(0);
}

void pgt_start(struct pgt *t, bool migrate)
{
    memset(t, 0, sizeof *t);
    const char *tag = getenv("SPOOL_TEST_TAG");
    char tmpl[64];
    snprintf(tmpl, sizeof tmpl, PGT_DIR_PREFIX "%.8s-XXXXXX", tag && *tag ? tag : "x");
    if (!mkdtemp(tmpl))
        die("mkdtemp", strerror(errno));
    if (sp_cluster_init(&t->cluster, tmpl, "spool_test"))
        die("cluster init", t->cluster.err);

    /* Close-on-exec, so that the server and pg_ctl never hold the write end. */
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        die("pipe", strerror(errno));
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        die("fork", strerror(errno));
    if (pid == 0) {
        close(fds[1]);
        /*
         * Close every other descriptor, the test's stdout and stderr too: the
         * test runner waits for those to close before it calls a test done.
         */
        int nul = open("/dev/null", O_RDWR);
        if (nul >= 0) {
            dup2(nul, 0), dup2(nul, 1), dup2(nul, 2);
        }
        for (int fd = 3; fd < 1024; fd++)
            if (fd != fds[0])
                close(fd);
        reaper_main(t, fds[0]);
    }
    close(fds[0]);
    t->reaper = pid;
    t->reaper_fd = fds[1];

    if (sp_cluster_start(&t->cluster, NULL))
        die("cluster start", t->cluster.err);
    sp_cluster_dsn(&t->cluster, NULL, t->dsn, sizeof t->dsn);
    if (migrate) {
        PGconn *c = pgt_connect(t);
        char err[1024];
        if (sp_migrate(c, sp_builtin_migrations, sp_builtin_migrations_count, NULL, err,
                       sizeof err))
            die("migrate", err);
        PQfinish(c);
    }
}

void pgt_createdb(struct pgt *t, const char *name, char *dsn, size_t cap)
{
    if (sp_cluster_createdb(&t->cluster, name))
        die("createdb", t->cluster.err);
    sp_cluster_dsn(&t->cluster, name, dsn, cap);
}

PGconn *pgt_connect(struct pgt *t)
{
    PGconn *c = PQconnectdb(t->dsn);
    if (PQstatus(c) != CONNECTION_OK)
        die("connect", PQerrorMessage(c));
    PQclear(PQexec(c, "SET client_min_messages = warning"));
    return c;
}

void pgt_stop(struct pgt *t)
{
    if (t->reaper <= 0)
        return;
    close(t->reaper_fd);
    int st;
    while (waitpid(t->reaper, &st, 0) < 0 && errno == EINTR)
        ;
    t->reaper = 0;
}

char *pgt_scalar(PGconn *conn, const char *sql)
{
    PGresult *r = PQexec(conn, sql);
    char *out = NULL;
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
        out = strdup(PQgetvalue(r, 0, 0));
    else if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fprintf(stderr, "pgtest: %s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
    return out;
}
