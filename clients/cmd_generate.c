/*
 * `spool generate`: runs prompts through one continuously batched engine on
 * this machine (CPU by default), printing each result as it finishes.
 */
#include "cli.h"

#include "spool/engine.h"
#include "spool/error.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

struct job {
    char *text; /* prompt text (chat rendered), malloc'd */
    bool chat;
    int32_t *ids;
    size_t n_ids;
    struct se_sampling sp;
    int32_t seq;
    char *out;
    size_t out_len, out_cap;
    enum se_finish finish;
    int n_prompt, n_gen;
    char *error; /* why this prompt failed (it alone), malloc'd; NULL when it ran */
};

static const char *usage =
    "usage: spool generate --model DIR (--prompt TEXT | --chat JSON | --prompts FILE.jsonl)\n"
    "                      [--max-tokens N] [--temperature T] [--top-p P] [--seed S]\n"
    "                      [--threads N] [--max-batch N] [--kv-memory BYTES]\n"
    "                      [--backend cpu|null|cuda] [--json]\n\n"
    "Generates text for each prompt with the model in DIR; all prompts run together\n"
    "in one continuously batched engine, and each result is printed as it finishes.\n"
    "  --prompt TEXT       one plain prompt (the tokenizer adds its bos, if any)\n"
    "  --chat JSON         one conversation: [{\"role\": \"user\", \"content\": \"...\"}, ...],\n"
    "                      rendered with the model's chat template\n"
    "  --prompts FILE      one JSON object per line: {\"prompt\": TEXT} or {\"messages\": [...]},\n"
    "                      optionally with max_tokens, temperature, top_p, seed; a bad\n"
    "                      line fails alone (reported in its place, exit status 1)\n"
    "  --max-tokens N      most tokens to generate (default 64)\n"
    "  --temperature T     0 = greedy (default 1)\n"
    "  --top-p P           nucleus sampling, in (0, 1] (default 1)\n"
    "  --seed S            sampling seed (default 0); runs with the same seed repeat\n"
    "  --threads N         CPU threads (default: all cores)\n"
    "  --max-batch N       sequences running at once (default 32)\n"
    "  --kv-memory BYTES   KV cache budget, with an optional K, M or G suffix (binary)\n"
    "                      (default: enough for the batch, at most 1G)\n"
    "  --backend NAME      cpu (default), null (no arithmetic: deterministic tokens, to\n"
    "                      measure overhead) or cuda (when built with CUDA)\n"
    "  --json              print one JSON object per prompt: text, token_ids,\n"
    "                      finish_reason, prompt_tokens, completion_tokens\n";

/* Parses BYTES with an optional K, M or G (binary) suffix; -1 when malformed or 0. */
static int parse_bytes(const char *s, size_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mul = 1;
    if (*end == 'K' || *end == 'k')
        mul = 1024;
    else if (*end == 'M' || *end == 'm')
        mul = 1024.0 * 1024;
    else if (*end == 'G' || *end == 'g')
        mul = 1024.0 * 1024 * 1024;
    if (mul > 1)
        end++;
    if (errno || end == s || *end || !(v * mul >= 1) || v * mul > 1e15)
        return -1;
    *out = (size_t)(v * mul);
    return 0;
}

static int parse_num(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return -1;
    *out = v;
    return 0;
}

/* Renders a messages array; returns 0, or -1 with the reason (prefixed by where) in err. */
static int render_chat(const se_tokenizer_t *tok, json_t *msgs, const char *where, char **text,
                       char *err, size_t errcap)
{
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        snprintf(err, errcap, "%s: messages must be a non-empty JSON array of {role, content}",
                 where);
        return -1;
    }
    size_t n = json_array_size(msgs);
    struct se_chat_msg *m = calloc(n, sizeof(*m));
    if (!m) {
        snprintf(err, errcap, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(msgs, i);
        json_t *r = json_object_get(o, "role"), *c = json_object_get(o, "content");
        if (!json_is_string(r) || !json_is_string(c)) {
            free(m);
            snprintf(err, errcap, "%s: message %zu needs string \"role\" and \"content\"", where,
                     i + 1);
            return -1;
        }
        m[i].role = json_string_value(r);
        m[i].content = json_string_value(c);
    }
    char why[512];
    int rc = se_chat_render(tok, m, n, true, text, why, sizeof(why));
    free(m);
    if (rc) {
        snprintf(err, errcap, "%s: %s", where, why);
        return -1;
    }
    return 0;
}

/* Marks job j as failed with msg, which is also reported on stderr. */
static void job_fail(struct job *j, const char *msg)
{
    fprintf(stderr, "error: %s\n", msg);
    free(j->error);
    j->error = strdup(msg);
    if (!j->error)
        j->error = "out of memory";
}

static int add_job(struct job **jobs, size_t *n, const struct job *j)
{
    struct job *nj = realloc(*jobs, (*n + 1) * sizeof(*nj));
    if (!nj)
        return -1;
    *jobs = nj;
    nj[(*n)++] = *j;
    return 0;
}

/*
 * Reads FILE.jsonl into jobs; per-line fields override the defaults in base.
 * A bad line becomes a failed job (it alone fails; the rest run); only an
 * unreadable file or running out of memory fails the whole command.
 */
static int read_prompts(const char *path, const se_tokenizer_t *tok, const struct se_sampling *base,
                        struct job **jobs, size_t *n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return cli_fail("%s: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int lineno = 0, rc = 0;
    while (!rc && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        char where[600], err[1024];
        snprintf(where, sizeof(where), "%s:%d", path, lineno);
        if (strspn(line, " \t\r\n") == (size_t)len)
            continue;
        struct job j = {.sp = *base};
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        json_t *p = json_object_get(o, "prompt"), *msgs = json_object_get(o, "messages");
        if (!json_is_object(o)) {
            snprintf(err, sizeof(err), "%s: not a JSON object (%s)", where,
                     o ? "wrong type" : je.text);
            job_fail(&j, err);
        } else if (json_is_string(p)) {
            j.text = strdup(json_string_value(p));
            if (!j.text)
                rc = cli_fail("out of memory");
        } else if (msgs) {
            if (render_chat(tok, msgs, where, &j.text, err, sizeof(err)) == 0)
                j.chat = true;
            else
                job_fail(&j, err);
        } else {
            snprintf(err, sizeof(err), "%s: needs \"prompt\" (a string) or \"messages\"", where);
            job_fail(&j, err);
        }
        json_t *v;
        if (!j.error && (v = json_object_get(o, "max_tokens")) && json_is_integer(v))
            j.sp.max_tokens = (int)json_integer_value(v);
        if (!j.error && (v = json_object_get(o, "temperature")) && json_is_number(v))
            j.sp.temperature = (float)json_number_value(v);
        if (!j.error && (v = json_object_get(o, "top_p")) && json_is_number(v))
            j.sp.top_p = (float)json_number_value(v);
        if (!j.error && (v = json_object_get(o, "seed")) && json_is_integer(v))
            j.sp.seed = (uint64_t)json_integer_value(v);
        json_decref(o);
        if (!rc && add_job(jobs, n, &j))
            rc = cli_fail("out of memory");
        if (rc) {
            free(j.text);
            free(j.error);
        }
    }
    free(line);
    fclose(f);
    if (!rc && *n == 0)
        rc = cli_fail("%s: no prompts", path);
    return rc;
}

static void print_json(const struct job *j, size_t index)
{
    if (j->error) {
        json_t *e = json_pack("{s:I, s:s}", "index", (json_int_t)index, "error", j->error);
        char *s = json_dumps(e, JSON_COMPACT | JSON_ENSURE_ASCII);
        puts(s);
        free(s);
        json_decref(e);
        return;
    }
    json_t *ids = json_array();
    for (int i = 0; i < j->n_gen; i++)
        json_array_append_new(ids, json_integer(j->ids[j->n_ids + (size_t)i]));
    json_t *o = json_pack("{s:I, s:s%, s:o, s:s, s:i, s:i}", "index", (json_int_t)index, "text",
                          j->out ? j->out : "", j->out_len, "token_ids", ids, "finish_reason",
                          se_finish_name(j->finish), "prompt_tokens", j->n_prompt,
                          "completion_tokens", j->n_gen);
    char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    puts(s);
    free(s);
    json_decref(o);
}

int cmd_generate(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"prompt", required_argument, NULL, 'p'},
        {"chat", required_argument, NULL, 'c'},
        {"prompts", required_argument, NULL, 'f'},
        {"max-tokens", required_argument, NULL, 'n'},
        {"temperature", required_argument, NULL, 't'},
        {"top-p", required_argument, NULL, 'P'},
        {"seed", required_argument, NULL, 's'},
        {"threads", required_argument, NULL, 'T'},
        {"max-batch", required_argument, NULL, 'B'},
        {"kv-memory", required_argument, NULL, 'K'},
        {"backend", required_argument, NULL, 'b'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model_dir = NULL, *prompt = NULL, *chat = NULL, *prompts = NULL;
    struct se_sampling sp;
    se_sampling_default(&sp);
    sp.max_tokens = 64;
    int threads = 0, max_batch = 0;
    size_t kv_bytes = 0;
    const char *backend = "cpu";
    bool json = false;
    double v;
    int ch;
    const char *prog = "spool generate";
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            model_dir = optarg;
            break;
        case 'p':
            prompt = optarg;
            break;
        case 'c':
            chat = optarg;
            break;
        case 'f':
            prompts = optarg;
            break;
        case 'n':
            if (parse_num(optarg, 1, 1 << 24, &v) || v != (int)v)
                return cli_usage_error(prog, "--max-tokens must be a positive integer");
            sp.max_tokens = (int)v;
            break;
        case 't':
            if (parse_num(optarg, 0, 100, &v))
                return cli_usage_error(prog, "--temperature must be a number >= 0");
            sp.temperature = (float)v;
            break;
        case 'P':
            if (parse_num(optarg, 0, 1, &v) || v == 0)
                return cli_usage_error(prog, "--top-p must be in (0, 1]");
            sp.top_p = (float)v;
            break;
        case 's':
            if (parse_num(optarg, 0, 1.8e19, &v) || v != (double)(uint64_t)v)
                return cli_usage_error(prog, "--seed must be a non-negative integer");
            sp.seed = strtoull(optarg, NULL, 10);
            break;
        case 'T':
            if (parse_num(optarg, 1, 1024, &v) || v != (int)v)
                return cli_usage_error(prog, "--threads must be a positive integer");
            threads = (int)v;
            break;
        case 'B':
            if (parse_num(optarg, 1, 4096, &v) || v != (int)v)
                return cli_usage_error(prog, "--max-batch must be an integer from 1 to 4096");
            max_batch = (int)v;
            break;
        case 'K':
            if (parse_bytes(optarg, &kv_bytes))
                return cli_usage_error(prog, "--kv-memory must be a size such as 64M or 1G");
            break;
        case 'b':
            if (strcmp(optarg, "cpu") && strcmp(optarg, "null") && strcmp(optarg, "cuda"))
                return cli_usage_error(prog, "--backend must be cpu, null or cuda");
            backend = optarg;
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return CLI_OK;
        default:
            return cli_usage_error(prog, "bad option");
        }
    }
    if (optind < argc)
        return cli_usage_error(prog, "unexpected argument '%s'", argv[optind]);
    if (!model_dir)
        return cli_usage_error(prog, "--model DIR is required");
    if (!!prompt + !!chat + !!prompts != 1)
        return cli_usage_error(prog, "give exactly one of --prompt, --chat, --prompts");

    char err[1024];
    se_model_t *model = NULL;
    se_tokenizer_t *tok = NULL;
    se_engine_t *eng = NULL;
    struct job *jobs = NULL;
    size_t n_jobs = 0;
    int rc = CLI_OK;
    if (se_model_open(model_dir, &model, err, sizeof(err))) {
        rc = cli_fail("%s", err);
        goto out;
    }
    if (se_tokenizer_open(model_dir, &tok, err, sizeof(err))) {
        rc = cli_fail("%s", err);
        goto out;
    }
    if (prompt) {
        struct job j = {.text = strdup(prompt), .sp = sp};
        if (!j.text || add_job(&jobs, &n_jobs, &j)) {
            free(j.text);
            rc = cli_fail("out of memory");
            goto out;
        }
    } else if (chat) {
        json_error_t je;
        json_t *msgs = json_loads(chat, 0, &je);
        if (!msgs) {
            rc = cli_fail("--chat: invalid JSON at column %d: %s", je.column, je.text);
            goto out;
        }
        struct job j = {.sp = sp, .chat = true};
        rc = render_chat(tok, msgs, "--chat", &j.text, err, sizeof(err)) ? cli_fail("%s", err) : 0;
        json_decref(msgs);
        if (rc || add_job(&jobs, &n_jobs, &j)) {
            free(j.text);
            rc = rc ? rc : cli_fail("out of memory");
            goto out;
        }
    } else if ((rc = read_prompts(prompts, tok, &sp, &jobs, &n_jobs))) {
        goto out;
    }
    struct se_engine_opts eo = {.n_threads = threads,
                                .max_seqs = max_batch,
                                .kv_bytes = kv_bytes,
                                .backend = backend,
                                .tok = tok};
    if (se_engine_open(model, &eo, &eng, err, sizeof(err))) {
        rc = cli_fail("%s", err);
        goto out;
    }
    /*
     * With --prompts a prompt that cannot run fails alone (reported in its
     * place; the exit status is 1 once the others have run); a single
     * --prompt or --chat fails the command at once.
     */
    size_t n_failed = 0;
    for (size_t i = 0; i < n_jobs; i++) {
        struct job *j = &jobs[i];
        char why[1200];
        why[0] = '\0';
        if (j->error) {
            /* already reported while reading */
        } else if (!*j->text) {
            snprintf(why, sizeof(why), "prompt %zu is empty: give some text to continue", i + 1);
        } else if (se_tokenizer_encode(tok, j->text, strlen(j->text), !j->chat, &j->ids,
                                       &j->n_ids)) {
            snprintf(why, sizeof(why), "prompt %zu: cannot tokenize", i + 1);
        } else {
            /* Room for the generated ids after the prompt's. */
            int32_t *grown =
                realloc(j->ids, (j->n_ids + (size_t)j->sp.max_tokens) * sizeof(int32_t));
            if (!grown) {
                rc = cli_fail("out of memory");
                goto out;
            }
            j->ids = grown;
            struct se_seq_params p = {
                .prompt = j->ids, .n_prompt = j->n_ids, .sampling = j->sp, .user = i};
            if (se_engine_submit(eng, &p, &j->seq, err, sizeof(err)))
                snprintf(why, sizeof(why), "prompt %zu: %s", i + 1, err);
        }
        if (why[0] && !prompts) {
            rc = cli_fail("%s", why);
            goto out;
        }
        if (why[0])
            job_fail(j, why);
        if (j->error) {
            n_failed++;
            if (json)
                print_json(j, i);
            else
                printf("[%zu] error: %s\n", i + 1, j->error);
            fflush(stdout);
        }
    }
    for (;;) {
        const struct se_event *ev;
        int n = se_engine_step(eng, &ev);
        if (n < 0) {
            rc = cli_fail("generation failed: %s", se_engine_error(eng));
            goto out;
        }
        for (int k = 0; k < n; k++) {
            struct job *j = &jobs[ev[k].user];
            if (ev[k].token >= 0)
                j->ids[j->n_ids + (size_t)j->n_gen] = ev[k].token;
            j->n_gen = ev[k].n_generated;
            j->n_prompt = ev[k].n_prompt;
            j->finish = ev[k].finish;
            if (ev[k].text_len) {
                size_t need = j->out_len + ev[k].text_len + 1;
                if (need > j->out_cap) {
                    char *no = realloc(j->out, need * 2);
                    if (!no) {
                        rc = cli_fail("out of memory");
                        goto out;
                    }
                    j->out = no;
                    j->out_cap = need * 2;
                }
                memcpy(j->out + j->out_len, ev[k].text, ev[k].text_len);
                j->out_len += ev[k].text_len;
                j->out[j->out_len] = 0;
            }
            if (ev[k].finish == SE_FINISH_NONE)
                continue;
            /* Printed as it finishes; --json lines carry the prompt's index. */
            size_t i = (size_t)ev[k].user;
            if (json)
                print_json(j, i);
            else if (n_jobs == 1)
                printf("%s\n", j->out ? j->out : "");
            else
                printf("[%zu] %s\n", i + 1, j->out ? j->out : "");
            fflush(stdout);
        }
        if (n == 0 && se_engine_n_active(eng) == 0)
            break;
    }
    if (n_failed)
        rc =
            cli_fail("%zu of %zu prompts failed (each is reported in its place)", n_failed, n_jobs);
out:
    for (size_t i = 0; i < n_jobs; i++) {
        free(jobs[i].text);
        free(jobs[i].ids);
        free(jobs[i].out);
        if (jobs[i].error && strcmp(jobs[i].error, "out of memory") != 0)
            free(jobs[i].error);
    }
    free(jobs);
    se_engine_close(eng);
    if (tok)
        se_tokenizer_close(tok);
    se_model_close(model);
    return rc;
}
