#include "spool/cluster.h"
#include "spool/error.h"
#include "spool_config.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <libpq-fe.h>

static int fail(struct sp_cluster *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(struct sp_cluster *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return code;
}

static int mkdir_p(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, mode) != 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, mode) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

int sp_cluster_init(struct sp_cluster *c, const char *dir, const char *dbname)
{
    memset(c, 0, sizeof *c);
    const char *bindir = getenv("SPOOL_PG_BINDIR");
    snprintf(c->bindir, sizeof c->bindir, "%s", bindir && *bindir ? bindir : SPOOL_PG_BINDIR);
    snprintf(c->dbname, sizeof c->dbname, "%s", dbname ? dbname : "spool");
    if (mkdir_p(dir, 0755) != 0)
        return fail(c, SP_EIO, "cannot create %s: %s", dir, strerror(errno));
    char abs[PATH_MAX];
    if (!realpath(dir, abs))
        return fail(c, SP_EIO, "cannot resolve %s: %s", dir, strerror(errno));
    /* The socket lives at DIR/run/.s.PGSQL.5432 and must fit in sun_path. */
    struct sockaddr_un sun;
    if (strlen(abs) + strlen("/run/.s.PGSQL.5432") >= sizeof sun.sun_path ||
        strlen(abs) >= sizeof c->dir)
        return fail(c, SP_EINVAL,
                    "cluster directory %s is too long for a unix socket path (limit about 90 "
                    "bytes); set SPOOL_HOME to a shorter path",
                    abs);
    snprintf(c->dir, sizeof c->dir, "%s", abs);

    c->run_uid = geteuid();
    c->run_gid = getegid();
    if (c->run_uid == 0) {
        struct passwd *pw = getpwnam("postgres");
        if (!pw)
            return fail(c, SP_ENOENT,
                        "running as root, but there is no 'postgres' OS user to run the server "
                        "as; install postgresql-15 (ops/setup) or run as an ordinary user");
        c->run_uid = pw->pw_uid;
        c->run_gid = pw->pw_gid;
        c->as_other = true;
    }
    return 0;
}

bool sp_cluster_exists(const struct sp_cluster *c)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/data/PG_VERSION", c->dir);
    return access(path, F_OK) == 0;
}

int sp_cluster_run(struct sp_cluster *c, char *const argv[], const char *out_path)
{
    pid_t pid = fork();
    if (pid < 0)
        return fail(c, SP_ECHILD, "fork: %s", strerror(errno));
    if (pid == 0) {
        int fd = out_path ? open(out_path, O_WRONLY | O_CREAT | O_APPEND, 0644)
                          : open("/dev/null", O_WRONLY);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        int nul = open("/dev/null", O_RDONLY);
        if (nul >= 0) {
            dup2(nul, 0);
            close(nul);
        }
        if (c->as_other) {
            if (setgroups(0, NULL) != 0 || setgid(c->run_gid) != 0 || setuid(c->run_uid) != 0)
                _exit(126);
        }
        /* The server must outlive a test's process group being killed. */
        setsid();
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return fail(c, SP_ECHILD, "waitpid: %s", strerror(errno));
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

/* Hands path to the server's OS user, so the server may write there. */
static int give(struct sp_cluster *c, const char *path)
{
    if (c->as_other && chown(path, c->run_uid, c->run_gid) != 0)
        return fail(c, SP_EPERM, "cannot hand %s to the postgres user: %s", path, strerror(errno));
    return 0;
}

static int initdb(struct sp_cluster *c)
{
    char data[PATH_MAX], log[PATH_MAX], prog[PATH_MAX];
    snprintf(data, sizeof data, "%s/data", c->dir);
    snprintf(log, sizeof log, "%s/log", c->dir);
    snprintf(prog, sizeof prog, "%s/initdb", c->bindir);
    if (access(prog, X_OK) != 0)
        return fail(c, SP_ENOENT, "%s not found; install postgresql-15 (run ops/setup)", prog);
    int rc = give(c, c->dir);
    if (rc)
        return rc;
    /* The postgres user must be able to reach the directory. */
    if (c->as_other) {
        char parent[PATH_MAX];
        snprintf(parent, sizeof parent, "%s", c->dir);
        for (char *slash = strrchr(parent, '/'); slash && slash != parent;
             slash = strrchr(parent, '/')) {
            *slash = '\0';
            struct stat st;
            if (stat(parent, &st) == 0 && !(st.st_mode & S_IXOTH))
                return fail(c, SP_EPERM,
                            "the postgres user cannot enter %s (the server runs as postgres "
                            "when spool runs as root); use a SPOOL_HOME outside it, such as "
                            "/tmp/spool",
                            parent);
        }
    }
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0)
        close(fd);
    if ((rc = give(c, log)))
        return rc;
    char *argv[] = {prog,        "-D",    data, "-U",   "postgres",
                    "-A",        "trust", "-E", "UTF8", "--locale=C.UTF-8",
                    "--no-sync", NULL};
    rc = sp_cluster_run(c, argv, log);
    if (rc != 0)
        return fail(c, SP_ECHILD, "initdb failed; see %s/log", c->dir);
    return 0;
}

long sp_cluster_pid(const struct sp_cluster *c)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/data/postmaster.pid", c->dir);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    long pid = 0;
    if (fscanf(f, "%ld", &pid) != 1)
        pid = 0;
    fclose(f);
    if (pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH)
        pid = 0;
    return pid;
}

int sp_cluster_dsn(const struct sp_cluster *c, const char *dbname, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "host=%s/run port=5432 user=postgres dbname=%s", c->dir,
                     dbname ? dbname : c->dbname);
    return n > 0 && (size_t)n < cap ? 0 : SP_ETOOBIG;
}

int sp_cluster_createdb(struct sp_cluster *c, const char *name)
{
    char dsn[512];
    sp_cluster_dsn(c, "postgres", dsn, sizeof dsn);
    PGconn *conn = PQconnectdb(dsn);
    if (PQstatus(conn) != CONNECTION_OK) {
        fail(c, SP_EDB, "cannot connect to the new cluster: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return SP_EDB;
    }
    const char *params[1] = {name};
    PGresult *r = PQexecParams(conn, "SELECT 1 FROM pg_database WHERE datname = $1", 1, NULL,
                               params, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        rc = fail(c, SP_EDB, "%s", PQerrorMessage(conn));
    } else if (PQntuples(r) == 0) {
        char *ident = PQescapeIdentifier(conn, name, strlen(name));
        char sql[256];
        snprintf(sql, sizeof sql, "CREATE DATABASE %s", ident);
        PQfreemem(ident);
        PGresult *r2 = PQexec(conn, sql);
        if (PQresultStatus(r2) != PGRES_COMMAND_OK)
            rc = fail(c, SP_EDB, "CREATE DATABASE %s failed: %s", name, PQerrorMessage(conn));
        PQclear(r2);
    }
    PQclear(r);
    PQfinish(conn);
    return rc;
}

int sp_cluster_start(struct sp_cluster *c, const char *extra_opts)
{
    int rc;
    if (!sp_cluster_exists(c) && (rc = initdb(c)))
        return rc;
    char run[PATH_MAX], data[PATH_MAX], log[PATH_MAX], prog[PATH_MAX], opts[1024];
    snprintf(run, sizeof run, "%s/run", c->dir);
    snprintf(data, sizeof data, "%s/data", c->dir);
    snprintf(log, sizeof log, "%s/log", c->dir);
    snprintf(prog, sizeof prog, "%s/pg_ctl", c->bindir);
    if (mkdir(run, 0700) != 0 && errno != EEXIST)
        return fail(c, SP_EIO, "cannot create %s: %s", run, strerror(errno));
    if ((rc = give(c, run)))
        return rc;
    if (sp_cluster_pid(c) == 0) {
        snprintf(opts, sizeof opts,
                 "-c listen_addresses='' -k %s -p 5432 -c fsync=off -c synchronous_commit=off "
                 "-c full_page_writes=off -c shared_buffers=32MB -c max_connections=100 %s",
                 run, extra_opts ? extra_opts : "");
        char *argv[] = {prog, "-w", "-t", "60", "-D", data, "-l", log, "-o", opts, "start", NULL};
        rc = sp_cluster_run(c, argv, NULL);
        if (rc != 0)
            return fail(c, SP_ECHILD, "pg_ctl start failed; see %s/log", c->dir);
    }
    return sp_cluster_createdb(c, c->dbname);
}

int sp_cluster_stop(struct sp_cluster *c, bool immediate)
{
    if (sp_cluster_pid(c) == 0)
        return 0;
    char data[PATH_MAX], prog[PATH_MAX];
    snprintf(data, sizeof data, "%s/data", c->dir);
    snprintf(prog, sizeof prog, "%s/pg_ctl", c->bindir);
    char *argv[] = {prog,   "-w", "-t", "60", "-D", data, "-m", immediate ? "immediate" : "fast",
                    "stop", NULL};
    int rc = sp_cluster_run(c, argv, NULL);
    if (rc != 0 && sp_cluster_pid(c) != 0)
        return fail(c, SP_ECHILD, "pg_ctl stop failed for %s", c->dir);
    return 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path) != 0 && errno != ENOENT ? -1 : 0;
}

int sp_cluster_remove(struct sp_cluster *c)
{
    if (c->dir[0] == '\0' || strcmp(c->dir, "/") == 0)
        return SP_EINVAL;
    if (nftw(c->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT)
        return fail(c, SP_EIO, "cannot remove %s: %s", c->dir, strerror(errno));
    return 0;
}
