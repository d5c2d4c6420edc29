/* The `spool` command-line tool: subcommand dispatch. */
#include "cli.h"

#include "spool/log.h"
#include "spool_config.h"

#include <signal.h>
#include <string.h>

static int cmd_version(int argc, char **argv)
{
    (void)argc, (void)argv;
    printf("spool %s\n", SPOOL_VERSION);
    return CLI_OK;
}

static const struct cli_cmd commands[] = {
    {"dev", "run a private PostgreSQL for development (up, down, status, psql)", cmd_dev},
    {"db", "database administration (migrate, status)", cmd_db},
    {"generate", "generate text with a model on this machine's CPU", cmd_generate},
    {"keys", "API keys for the HTTP lane (create, list, revoke)", cmd_keys},
    {"models", "the model registry (push, list, show, alias) and inspect", cmd_models},
    {"tenants", "tenants and their database roles (create, list)", cmd_tenants},
    {"tokenize", "show how a model's tokenizer splits a text", cmd_tokenize},
    {"version", "print the version", cmd_version},
    {NULL, NULL, NULL},
};

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    sp_log_init("spool");
    if (argc >= 2 && strcmp(argv[1], "--version") == 0)
        return cmd_version(argc, argv);
    return cli_dispatch("spool",
                        "Spool: batch and live LLM inference jobs on PostgreSQL.\n"
                        "Environment: SPOOL_DSN (database), SPOOL_HOME (private cluster, default "
                        "./.spool),\nSPOOL_LOG_LEVEL, SPOOL_LOG_FORMAT (plain|json).",
                        commands, argc, argv);
}
