/* Internal to common/pg.c and common/pgconn.c. */
#ifndef SPOOL_PG_INTERNAL_H
#define SPOOL_PG_INTERNAL_H

#include <stddef.h>

/*
 * Copies a libpq message (often several lines, with tabs and a final newline)
 * into buf of size cap as one line: line breaks become "; ", tabs spaces, and
 * trailing separators go. msg NULL gives "".
 */
void sp__pg_one_line(char *buf, size_t cap, const char *msg);

#endif
