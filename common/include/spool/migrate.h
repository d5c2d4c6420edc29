/*
 * Schema migrations: numbered SQL files applied in order, each in its own
 * transaction, recorded in spool.schema_migrations with a sha256 checksum.
 *
 * The migrator holds a PostgreSQL advisory lock for the whole run, so two
 * migrators racing apply each file exactly once. Running it again is a no-op.
 * A recorded file whose content changed since it was applied is an error that
 * names the file. A migration must not contain its own BEGIN/COMMIT.
 */
#ifndef SPOOL_MIGRATE_H
#define SPOOL_MIGRATE_H

#include <stddef.h>

#include <libpq-fe.h>

struct sp_migration {
    const char *name; /* file name, such as "0001_init.sql"; orders the set */
    const char *sql;
    size_t len;
};

/* The migrations under sql/migrations, compiled into the program, in order. */
extern const struct sp_migration sp_builtin_migrations[];
extern const size_t sp_builtin_migrations_count;

/*
 * Reads every *.sql file of dir, sorted by name. On success *out is an array
 * of *n entries owned by the caller (free with sp_migrations_free).
 * Returns 0, or SP_EIO / SP_ENOMEM with a message in err.
 */
int sp_migrations_load_dir(const char *dir, struct sp_migration **out, size_t *n, char *err,
                           size_t errcap);
void sp_migrations_free(struct sp_migration *m, size_t n);

/*
 * Applies every migration not yet recorded. *applied (may be NULL) receives
 * how many were applied now. Returns 0, SP_ECHECKSUM when an applied file has
 * changed, or SP_EDB; err names the file and the server's message.
 */
int sp_migrate(PGconn *conn, const struct sp_migration *m, size_t n, int *applied, char *err,
               size_t errcap);

/* Writes the lowercase hex sha256 of data (65 bytes with the NUL) into hex. */
void sp_sha256_hex(const void *data, size_t len, char hex[65]);

#endif
