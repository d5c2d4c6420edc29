/*
 * A private PostgreSQL cluster: the one `spool dev` runs under ./.spool and the
 * one each integration test starts for itself.
 *
 * The cluster listens on a unix socket only (in DIR/run), accepts local
 * connections without a password, and has the superuser "postgres". When the
 * caller is root, initdb and the server run as the "postgres" OS user (initdb
 * refuses root), and DIR is handed to that user.
 *
 * Layout under DIR: data/ (PGDATA), run/ (socket), log (server log).
 */
#ifndef SPOOL_CLUSTER_H
#define SPOOL_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct sp_cluster {
    char dir[256];    /* the cluster's home (absolute) */
    char bindir[256]; /* PostgreSQL server binaries */
    char dbname[64];  /* the database `spool dev` and tests use */
    uid_t run_uid;    /* OS user the server runs as */
    gid_t run_gid;
    bool as_other; /* true when run_uid differs from our own */
    char err[512]; /* message for the last failure */
};

/*
 * Fills c for the cluster at dir (made absolute; created if missing). Reads no
 * files yet. Returns 0, or SP_EINVAL when the path is too long for a socket,
 * or SP_ENOENT when root cannot find the postgres OS user.
 */
int sp_cluster_init(struct sp_cluster *c, const char *dir, const char *dbname);

/* True once initdb has run in c->dir. */
bool sp_cluster_exists(const struct sp_cluster *c);

/*
 * Runs initdb when needed, starts the server (waiting until it accepts
 * connections) and creates c->dbname when missing. extra_opts (may be NULL) is
 * appended to the server's -o options. Returns 0, SP_ECHILD with c->err naming
 * the failing command and the log file, or another SP_E* code.
 */
int sp_cluster_start(struct sp_cluster *c, const char *extra_opts);

/* Stops the server (fast, or immediate when immediate is true). Stopping a stopped cluster is 0. */
int sp_cluster_stop(struct sp_cluster *c, bool immediate);

/* Returns the postmaster's pid when running, 0 when stopped, negative on error. */
long sp_cluster_pid(const struct sp_cluster *c);

/* Writes the libpq connection string for dbname (c->dbname when NULL) into buf. */
int sp_cluster_dsn(const struct sp_cluster *c, const char *dbname, char *buf, size_t cap);

/* Creates database name unless it exists. */
int sp_cluster_createdb(struct sp_cluster *c, const char *name);

/* Removes c->dir and everything under it (the cluster must be stopped). */
int sp_cluster_remove(struct sp_cluster *c);

/*
 * Runs argv (argv[0] a path) as c's OS user, waiting for it; output goes to
 * out_path when not NULL (appended), else is discarded. Returns the exit status
 * (0..255), or a negative SP_E* code when the process could not run.
 */
int sp_cluster_run(struct sp_cluster *c, char *const argv[], const char *out_path);

#endif
