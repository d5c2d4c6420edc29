/* `spool tokenize`: shows how a model's tokenizer splits a text. */
#include "cli.h"

#include "spool/error.h"
#include "spool/tokenizer.h"

#include <getopt.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static char *read_stdin(size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, stdin);
        n += got;
        if (got == 0)
            break;
        if (n == cap) {
            char *p = realloc(buf, cap *= 2);
            if (!p) {
                free(buf);
                return NULL;
            }
            buf = p;
        }
    }
    *len = n;
    return buf;
}

static int print_json(const se_tokenizer_t *tok, const int32_t *ids, size_t n, const char *text,
                      size_t len)
{
    json_t *root = json_object(), *jids = json_array(), *jtoks = json_array();
    for (size_t i = 0; i < n; i++) {
        const char *p = se_tokenizer_piece(tok, ids[i]);
        json_array_append_new(jids, json_integer(ids[i]));
        json_array_append_new(jtoks, p ? json_string(p) : json_null());
    }
    json_object_set_new(root, "ids", jids);
    json_object_set_new(root, "tokens", jtoks);
    /* The text; when it is not valid UTF-8, the decoded ids instead. */
    char *dec = NULL;
    size_t dl = 0;
    json_t *jtext = json_stringn(text, len);
    if (!jtext && se_tokenizer_decode(tok, ids, n, false, &dec, &dl) == 0)
        jtext = json_stringn(dec, dl);
    free(dec);
    json_object_set_new(root, "text", jtext ? jtext : json_null());
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!s)
        return cli_fail("out of memory");
    puts(s);
    free(s);
    return CLI_OK;
}

int cmd_tokenize(int argc, char **argv)
{
    const char *usage =
        "usage: spool tokenize --model DIR [--ids|--json] [--no-special] TEXT\n\n"
        "Encodes TEXT (or standard input when TEXT is -) with the tokenizer in DIR\n"
        "(tokenizer.json and tokenizer_config.json) and prints the tokens.\n"
        "  --model DIR    the model directory\n"
        "  --ids          print the ids, separated by spaces\n"
        "  --json         print {\"ids\": [...], \"tokens\": [...], \"text\": ...}\n"
        "  --no-special   do not add the post-processor's tokens (such as a bos)\n"
        "By default the tokens are printed as the vocabulary's pieces, one per line.\n";
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'}, {"ids", no_argument, NULL, 'i'},
        {"json", no_argument, NULL, 'j'},        {"no-special", no_argument, NULL, 'n'},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0},
    };
    const char *model = NULL;
    bool ids_only = false, as_json = false, add_special = true;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            model = optarg;
            break;
        case 'i':
            ids_only = true;
            break;
        case 'j':
            as_json = true;
            break;
        case 'n':
            add_special = false;
            break;
        case 'h':
            fputs(usage, stdout);
            return CLI_OK;
        default:
            return cli_usage_error("spool tokenize", "bad option");
        }
    }
    if (!model)
        return cli_usage_error("spool tokenize", "--model DIR is required");
    if (ids_only && as_json)
        return cli_usage_error("spool tokenize", "--ids and --json exclude each other");
    if (optind + 1 != argc)
        return cli_usage_error("spool tokenize", optind >= argc ? "TEXT is missing (use - for "
                                                                  "standard input)"
                                                                : "give TEXT as one argument");
    const char *arg = argv[optind];
    char *owned = NULL;
    size_t len = strlen(arg);
    const char *text = arg;
    if (strcmp(arg, "-") == 0) {
        owned = read_stdin(&len);
        if (!owned)
            return cli_fail("cannot read standard input");
        text = owned;
    }

    char err[1024];
    se_tokenizer_t *tok = NULL;
    int rc = se_tokenizer_open(model, &tok, err, sizeof err);
    if (rc) {
        free(owned);
        return cli_fail("%s", err);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    int out = CLI_OK;
    rc = se_tokenizer_encode(tok, text, len, add_special, &ids, &n);
    if (rc) {
        out = cli_fail("cannot encode the text: %s", sp_strerror(rc));
    } else if (as_json) {
        out = print_json(tok, ids, n, text, len);
    } else {
        for (size_t i = 0; i < n; i++) {
            if (ids_only)
                printf(i ? " %d" : "%d", ids[i]);
            else
                printf("%s\n", se_tokenizer_piece(tok, ids[i]));
        }
        if (ids_only)
            putchar('\n');
    }
    free(ids);
    free(owned);
    se_tokenizer_close(tok);
    return out;
}
