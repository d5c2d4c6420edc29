#include "cli.h"

#include "spool/cluster.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int cli_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return CLI_FAIL;
}

int cli_usage_error(const char *prog, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("usage error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(see '%s --help')\n", prog);
    va_end(ap);
    return CLI_USAGE;
}

static void print_group_help(FILE *f, const char *prog, const char *about,
                             const struct cli_cmd *cmds)
{
    fprintf(f, "usage: %s COMMAND [ARGS...]\n\n%s\n\ncommands:\n", prog, about);
    for (const struct cli_cmd *c = cmds; c->name; c++)
        fprintf(f, "  %-14s %s\n", c->name, c->summary);
    fprintf(f, "\nRun '%s COMMAND --help' for a command's options.\n", prog);
}

int cli_dispatch(const char *prog, const char *about, const struct cli_cmd *cmds, int argc,
                 char **argv)
{
    if (argc < 2) {
        print_group_help(stderr, prog, about, cmds);
        return CLI_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        print_group_help(stdout, prog, about, cmds);
        return CLI_OK;
    }
    for (const struct cli_cmd *c = cmds; c->name; c++)
        if (strcmp(c->name, argv[1]) == 0)
            return c->run(argc - 1, argv + 1);
    return cli_usage_error(prog, "unknown command '%s'", argv[1]);
}

const char *cli_spool_home(void)
{
    const char *h = getenv("SPOOL_HOME");
    return h && *h ? h : ".spool";
}

const char *cli_dsn(const char *flag_value)
{
    static char buf[512];
    if (flag_value && *flag_value)
        return flag_value;
    const char *env = getenv("SPOOL_DSN");
    if (env && *env)
        return env;
    struct sp_cluster c;
    if (sp_cluster_init(&c, cli_spool_home(), NULL) == 0 && sp_cluster_exists(&c) &&
        sp_cluster_pid(&c) > 0 && sp_cluster_dsn(&c, NULL, buf, sizeof buf) == 0)
        return buf;
    return NULL;
}
