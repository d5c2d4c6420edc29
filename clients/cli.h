/*
 * Subcommand dispatch for the `spool` CLI.
 *
 * Exit codes: CLI_OK (0) success, CLI_FAIL (1) failure, CLI_USAGE (2) usage error.
 * Every command prints its usage for --help (exit 0) and on a usage error
 * (to stderr, exit 2).
 */
#ifndef SPOOL_CLI_H
#define SPOOL_CLI_H

#include <stdbool.h>
#include <stdio.h>

enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

struct cli_cmd {
    const char *name;
    const char *summary;
    /* argv[0] is the command's own name; returns an exit code. */
    int (*run)(int argc, char **argv);
};

/*
 * Runs the entry of cmds (terminated by a NULL name) named argv[1]; prog is the
 * command path printed in messages ("spool", "spool dev").
 */
int cli_dispatch(const char *prog, const char *about, const struct cli_cmd *cmds, int argc,
                 char **argv);

/* Prints "error: ..." to stderr and returns CLI_FAIL. */
int cli_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prints "usage error: ...", then a hint to use --help, and returns CLI_USAGE. */
int cli_usage_error(const char *prog, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The directory of the private development cluster: $SPOOL_HOME or ./.spool. */
const char *cli_spool_home(void);
/*
 * The database connection string: the --dsn value when given, else $SPOOL_DSN,
 * else the private development cluster's when it is running. NULL when none.
 * The result is static storage.
 */
const char *cli_dsn(const char *flag_value);

/* Command groups defined in their own files. */
int cmd_dev(int argc, char **argv);
int cmd_db(int argc, char **argv);
int cmd_models(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_keys(int argc, char **argv);    /* cmd_keys.c */
int cmd_tenants(int argc, char **argv); /* cmd_keys.c */

/* The model registry (cmd_registry.c), under `spool models`. */
int models_push(int argc, char **argv);
int models_list(int argc, char **argv);
int models_show(int argc, char **argv);
int models_alias(int argc, char **argv);

#endif
