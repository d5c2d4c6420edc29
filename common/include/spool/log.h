/*
 * Logging to stderr, as plain lines or JSON lines.
 *
 * Each record is formatted into one buffer and written with a single write(2),
 * so lines from several threads never interleave. Libraries log only through
 * this; they never print to stdout.
 *
 * Environment: SPOOL_LOG_LEVEL (debug, info, warn, error; default info) and
 * SPOOL_LOG_FORMAT (plain or json; default plain), read by sp_log_init().
 */
#ifndef SPOOL_LOG_H
#define SPOOL_LOG_H

#include <stdbool.h>
#include <stddef.h>

enum sp_log_level { SP_LOG_DEBUG, SP_LOG_INFO, SP_LOG_WARN, SP_LOG_ERROR, SP_LOG_OFF };

/* Sets the component name shown on each line and reads the environment. */
void sp_log_init(const char *component);
void sp_log_set_level(enum sp_log_level level);
void sp_log_set_json(bool json);
/* Sets the file descriptor records go to (stderr by default); for tests. */
void sp_log_set_fd(int fd);
/* Parses "debug", "info", "warn", "error" or "off"; returns -1 if unknown. */
int sp_log_parse_level(const char *name);
bool sp_log_enabled(enum sp_log_level level);

void sp_log(enum sp_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define sp_debug(...) sp_log(SP_LOG_DEBUG, __VA_ARGS__)
#define sp_info(...)  sp_log(SP_LOG_INFO, __VA_ARGS__)
#define sp_warn(...)  sp_log(SP_LOG_WARN, __VA_ARGS__)
#define sp_error(...) sp_log(SP_LOG_ERROR, __VA_ARGS__)

/*
 * Appends s as the body of a JSON string (without quotes) to buf of size cap,
 * starting at *len; bytes that do not fit are dropped and buf stays
 * NUL-terminated. Invalid UTF-8 bytes are written as \u00XX escapes.
 */
void sp_json_escape(char *buf, size_t cap, size_t *len, const char *s);

#endif
