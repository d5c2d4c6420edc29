/*
 * Test harness: a throwaway PostgreSQL cluster per test.
 *
 * pgt_start() makes a directory /tmp/spt-TAG-XXXXXX, starts a private cluster there
 * (see spool/cluster.h), creates the database and, when asked, applies the
 * built-in migrations. pgt_stop() stops the server and removes the directory.
 *
 * Cleanup also happens when the test dies: pgt_start() forks a reaper in a
 * session of its own that waits on a pipe from the test; when the test exits
 * for any reason (failure, abort, sanitizer report, kill -9) the pipe closes
 * and the reaper stops the server and removes the directory.
 *
 * Tests run in parallel: each cluster has its own socket directory, so nothing
 * is shared.
 */
#ifndef SPOOL_PGTEST_H
#define SPOOL_PGTEST_H

#include "spool/cluster.h"

#include <stdbool.h>
#include <sys/types.h>

#include <libpq-fe.h>

/*
 * Directories are /tmp/spt-TAG-XXXXXX, TAG from $SPOOL_TEST_TAG (one per build
 * directory, set by meson), so that a leftover check sees only its own build.
 */
#define PGT_DIR_PREFIX "/tmp/spt-"

struct pgt {
    struct sp_cluster cluster;
    char dsn[512];
    pid_t reaper;
    int reaper_fd; /* write end of the pipe the reaper watches */
};

/* Starts a cluster; aborts the test with a message on failure. */
void pgt_start(struct pgt *t, bool migrate);
/* Creates another database in the same cluster; writes its DSN into dsn. */
void pgt_createdb(struct pgt *t, const char *name, char *dsn, size_t cap);
/* Connects to t->dsn; aborts on failure. */
PGconn *pgt_connect(struct pgt *t);
/* Stops the server and removes its directory. */
void pgt_stop(struct pgt *t);

/* Runs sql and returns the first column of the first row as a new string (or NULL). */
char *pgt_scalar(PGconn *conn, const char *sql);

#endif
