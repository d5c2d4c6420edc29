/*
 * Chat templates rendered in C. The family is recognised from markers in
 * tokenizer_config.json's chat_template, and each renderer reproduces what
 * that family's Jinja template produces for plain system / user / assistant
 * messages (no tools): Llama 3 (and 3.1's knowledge-date system header),
 * ChatML (Qwen2 / Qwen2.5 with their default system prompt, Qwen3 with its
 * <think> handling), Llama 2 chat (<<SYS>>) and Mistral-Instruct [INST].
 */
#include "tok_internal.h"

#include "spool/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum family { FAM_LLAMA3, FAM_CHATML, FAM_QWEN3, FAM_LLAMA2, FAM_MISTRAL };

struct out {
    struct se__buf b;
    int rc;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (!o->rc && se__buf_add(&o->b, s, n))
        o->rc = SP_ENOMEM;
}

static void puts_(struct out *o, const char *s)
{
    put(o, s ? s : "", s ? strlen(s) : 0);
}

/* Python's str.isspace() for one code point (what Jinja's trim and str.strip() remove). */
static bool py_space(uint32_t c)
{
    return (c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Narrows [*s, *s + *n) as str.strip() does: Unicode space, or only '\n' when newlines. */
static void strip(const char **s, size_t *n, bool left, bool right, bool newlines)
{
    const unsigned char *p = (const unsigned char *)*s;
    size_t a = 0, b = *n;
    while (left && a < b) {
        size_t cl = se__utf8_valid_len(p + a, b - a);
        if (!cl)
            break;
        size_t l;
        uint32_t c = se__utf8_get(p + a, &l);
        if (newlines ? c != '\n' : !py_space(c))
            break;
        a += cl;
    }
    while (right && b > a) {
        size_t i = b - 1;
        while (i > a && (p[i] & 0xC0) == 0x80)
            i--;
        size_t cl = se__utf8_valid_len(p + i, b - i);
        if (!cl)
            break;
        size_t l;
        uint32_t c = se__utf8_get(p + i, &l);
        if (newlines ? c != '\n' : !py_space(c))
            break;
        b = i;
    }
    *s = (const char *)p + a;
    *n = b - a;
}

static const char *find_n(const char *hay, size_t n, const char *needle)
{
    return memmem(hay, n, needle, strlen(needle));
}

/* ---- Llama 3 ---- */

static void render_llama3(const se_tokenizer_t *t, const struct se_chat_msg *m, size_t n, bool gen,
                          struct out *o)
{
    const char *tmpl = t->chat_template;
    size_t first = 0;
    puts_(o, t->bos_text);
    if (strstr(tmpl, "Cutting Knowledge Date")) {
        /* Llama 3.1 / 3.2: a system turn always opens with the knowledge dates. */
        char date[32] = "26 Jul 2024";
        if (strstr(tmpl, "strftime_now")) {
            time_t now = time(NULL);
            struct tm tm;
            gmtime_r(&now, &tm);
            strftime(date, sizeof date, "%d %b %Y", &tm);
        }
        const char *sys = "";
        size_t sl = 0;
        if (n > 0 && strcmp(m[0].role, "system") == 0) {
            sys = m[0].content;
            sl = strlen(sys);
            strip(&sys, &sl, true, true, false);
            first = 1;
        }
        puts_(o, "<|start_header_id|>system<|end_header_id|>\n\n");
        puts_(o, "Cutting Knowledge Date: December 2023\nToday Date: ");
        puts_(o, date);
        puts_(o, "\n\n");
        put(o, sys, sl);
        puts_(o, "<|eot_id|>");
    }
    for (size_t i = first; i < n; i++) {
        const char *c = m[i].content;
        size_t cl = strlen(c);
        strip(&c, &cl, true, true, false);
        puts_(o, "<|start_header_id|>");
        puts_(o, m[i].role);
        puts_(o, "<|end_header_id|>\n\n");
        put(o, c, cl);
        puts_(o, "<|eot_id|>");
    }
    if (gen)
        puts_(o, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* ---- ChatML / Qwen ---- */

/*
 * The default system prompt a ChatML template writes when the conversation
 * has none: the literal text in '<|im_start|>system\n...<|im_end|>', or NULL.
 */
static char *chatml_default_system(const char *tmpl)
{
    /* Templates write the newline as \n inside a Jinja string, or as a real newline. */
    static const char *const markers[] = {"<|im_start|>system\\n", "<|im_start|>system\n"};
    for (size_t k = 0; k < 2; k++) {
        const char *marker = markers[k];
        for (const char *p = strstr(tmpl, marker); p; p = strstr(p + 1, marker)) {
            const char *s = p + strlen(marker);
            const char *e = strstr(s, "<|im_end|>");
            if (!e || e == s)
                continue;
            bool literal = true;
            for (const char *q = s; q < e; q++)
                literal &= *q != '\'' && *q != '"' && *q != '{' && *q != '}' && *q != '\\';
            if (literal)
                return strndup(s, (size_t)(e - s));
        }
    }
    return NULL;
}

static void render_chatml(const se_tokenizer_t *t, const struct se_chat_msg *m, size_t n, bool gen,
                          struct out *o)
{
    if (n == 0 || strcmp(m[0].role, "system") != 0) {
        char *dflt = chatml_default_system(t->chat_template);
        if (dflt) {
            puts_(o, "<|im_start|>system\n");
            puts_(o, dflt);
            puts_(o, "<|im_end|>\n");
            free(dflt);
        }
    }
    for (size_t i = 0; i < n; i++) {
        puts_(o, "<|im_start|>");
        puts_(o, m[i].role);
        puts_(o, "\n");
        puts_(o, m[i].content);
        puts_(o, "<|im_end|>\n");
    }
    if (gen)
        puts_(o, "<|im_start|>assistant\n");
}

static bool has_prefix(const char *s, const char *p)
{
    return strncmp(s, p, strlen(p)) == 0;
}

static bool has_suffix(const char *s, const char *p)
{
    size_t a = strlen(s), b = strlen(p);
    return a >= b && memcmp(s + a - b, p, b) == 0;
}

/* Qwen3's template, for messages without tools or reasoning_content. */
static void render_qwen3(const se_tokenizer_t *t, const struct se_chat_msg *m, size_t n, bool gen,
                         struct out *o)
{
    (void)t;
    if (n > 0 && strcmp(m[0].role, "system") == 0) {
        puts_(o, "<|im_start|>system\n");
        puts_(o, m[0].content);
        puts_(o, "<|im_end|>\n");
    }
    /* The last user message that is not a tool response; the last message when none. */
    size_t last_query = n ? n - 1 : 0;
    for (size_t k = n; k-- > 0;) {
        if (strcmp(m[k].role, "user") == 0 && !(has_prefix(m[k].content, "<tool_response>") &&
                                                has_suffix(m[k].content, "</tool_response>"))) {
            last_query = k;
            break;
        }
    }
    for (size_t i = 0; i < n; i++) {
        const char *role = m[i].role, *c = m[i].content;
        if (strcmp(role, "user") == 0 || (strcmp(role, "system") == 0 && i > 0)) {
            puts_(o, "<|im_start|>");
            puts_(o, role);
            puts_(o, "\n");
            puts_(o, c);
            puts_(o, "<|im_end|>\n");
            continue;
        }
        if (strcmp(role, "assistant") != 0)
            continue;
        size_t cl = strlen(c);
        const char *content = c, *reason = "";
        size_t contl = cl, rl = 0;
        const char *close = strstr(c, "</think>");
        if (close) {
            /* content.split('</think>')[-1].lstrip('\n') */
            const char *last = close, *q;
            while ((q = strstr(last + 1, "</think>")))
                last = q;
            content = last + 8;
            contl = strlen(content);
            strip(&content, &contl, true, false, true);
            /* content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') */
            size_t hl = (size_t)(close - c);
            strip(&c, &hl, false, true, true);
            const char *open = c, *p;
            while ((p = find_n(open, hl - (size_t)(open - c), "<think>")))
                open = p + 7;
            reason = open;
            rl = hl - (size_t)(open - c);
            strip(&reason, &rl, true, false, true);
        }
        puts_(o, "<|im_start|>assistant\n");
        if (i > last_query && (i == n - 1 || rl > 0)) {
            const char *r = reason;
            size_t r2 = rl;
            strip(&r, &r2, true, true, true);
            puts_(o, "<think>\n");
            put(o, r, r2);
            puts_(o, "\n</think>\n\n");
            strip(&content, &contl, true, false, true);
        }
        put(o, content, contl);
        puts_(o, "<|im_end|>\n");
    }
    if (gen)
        puts_(o, "<|im_start|>assistant\n");
}

/* ---- [INST] families ---- */

static int check_alternation(const struct se_chat_msg *m, size_t n, size_t from, char *err,
                             size_t errcap)
{
    for (size_t i = from; i < n; i++) {
        bool user = strcmp(m[i].role, "user") == 0;
        if (user != ((i - from) % 2 == 0)) {
            snprintf(err, errcap,
                     "message %zu (%s): conversation roles must alternate user/assistant/user/...",
                     i, m[i].role);
            return SP_EINVAL;
        }
    }
    return 0;
}

static int render_llama2(const se_tokenizer_t *t, const struct se_chat_msg *m, size_t n,
                         struct out *o, char *err, size_t errcap)
{
    size_t from = n > 0 && strcmp(m[0].role, "system") == 0;
    int rc = check_alternation(m, n, from, err, errcap);
    if (rc)
        return rc;
    for (size_t i = from; i < n; i++) {
        struct se__buf content = {0};
        if (i == from && from) {
            se__buf_add(&content, "<<SYS>>\n", 8);
            se__buf_add(&content, m[0].content, strlen(m[0].content));
            se__buf_add(&content, "\n<</SYS>>\n\n", 11);
        }
        se__buf_add(&content, m[i].content, strlen(m[i].content));
        if (!content.p) {
            o->rc = SP_ENOMEM;
            return SP_ENOMEM;
        }
        const char *c = content.p;
        size_t cl = content.len;
        strip(&c, &cl, true, true, false);
        if (strcmp(m[i].role, "user") == 0) {
            puts_(o, t->bos_text);
            puts_(o, "[INST] ");
            put(o, c, cl);
            puts_(o, " [/INST]");
        } else {
            puts_(o, " ");
            put(o, c, cl);
            puts_(o, " ");
            puts_(o, t->eos_text);
        }
        free(content.p);
    }
    return 0;
}

static int render_mistral(const se_tokenizer_t *t, const struct se_chat_msg *m, size_t n,
                          struct out *o, char *err, size_t errcap)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(m[i].role, "system") == 0) {
            snprintf(err, errcap,
                     "message %zu: this Mistral template supports only user and "
                     "assistant roles",
                     i);
            return SP_EINVAL;
        }
    }
    int rc = check_alternation(m, n, 0, err, errcap);
    if (rc)
        return rc;
    bool eos_space = strstr(t->chat_template, "eos_token + ' '") != NULL;
    puts_(o, t->bos_text);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(m[i].role, "user") == 0) {
            puts_(o, "[INST] ");
            puts_(o, m[i].content);
            puts_(o, " [/INST]");
        } else {
            puts_(o, m[i].content);
            puts_(o, t->eos_text);
            if (eos_space)
                puts_(o, " ");
        }
    }
    return 0;
}

static int recognise(const se_tokenizer_t *t, enum family *f, char *err, size_t errcap)
{
    const char *tmpl = t->chat_template;
    const char *file = t->config_path ? t->config_path : "tokenizer_config.json";
    if (!tmpl) {
        snprintf(err, errcap, "%s: no chat_template found (%s); this model has no chat format",
                 file,
                 t->config_path ? "the file has no chat_template field" : "the file is absent");
        return SP_EUNSUPPORTED;
    }
    if (strstr(tmpl, "<|start_header_id|>"))
        *f = FAM_LLAMA3;
    else if (strstr(tmpl, "<|im_start|>"))
        *f = strstr(tmpl, "<think>") ? FAM_QWEN3 : FAM_CHATML;
    else if (strstr(tmpl, "[INST]") && strstr(tmpl, "<<SYS>>"))
        *f = FAM_LLAMA2;
    else if (strstr(tmpl, "[INST]") && !strstr(tmpl, "system_message") &&
             !strstr(tmpl, "[SYSTEM_PROMPT]") && !strstr(tmpl, "[AVAILABLE_TOOLS]"))
        *f = FAM_MISTRAL;
    else {
        snprintf(err, errcap,
                 "%s: the chat_template (\"%.60s...\") is not one of the known families "
                 "(Llama 3, ChatML/Qwen, Llama 2, Mistral [INST])",
                 file, tmpl);
        return SP_EUNSUPPORTED;
    }
    if ((*f == FAM_LLAMA2 || *f == FAM_MISTRAL) && (!t->bos_text || !t->eos_text)) {
        snprintf(err, errcap, "%s: the [INST] chat format needs bos_token and eos_token", file);
        return SP_EUNSUPPORTED;
    }
    return 0;
}

int se_chat_render(const se_tokenizer_t *tok, const struct se_chat_msg *msgs, size_t n,
                   bool add_generation_prompt, char **text, char *err, size_t errcap)
{
    char dummy[1];
    if (!err || !errcap) {
        err = dummy;
        errcap = sizeof dummy;
    }
    err[0] = '\0';
    *text = NULL;
    enum family f;
    int rc = recognise(tok, &f, err, errcap);
    if (rc)
        return rc;
    if (n == 0) {
        snprintf(err, errcap, "no messages to render");
        return SP_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        const char *r = msgs[i].role;
        if (!r || !msgs[i].content ||
            (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant"))) {
            snprintf(err, errcap, "message %zu: role must be system, user or assistant (got %s)", i,
                     r ? r : "none");
            return SP_EINVAL;
        }
    }
    struct out o = {0};
    puts_(&o, "");
    switch (f) {
    case FAM_LLAMA3:
        render_llama3(tok, msgs, n, add_generation_prompt, &o);
        break;
    case FAM_CHATML:
        render_chatml(tok, msgs, n, add_generation_prompt, &o);
        break;
    case FAM_QWEN3:
        render_qwen3(tok, msgs, n, add_generation_prompt, &o);
        break;
    case FAM_LLAMA2:
        rc = render_llama2(tok, msgs, n, &o, err, errcap);
        break;
    case FAM_MISTRAL:
        rc = render_mistral(tok, msgs, n, &o, err, errcap);
        break;
    }
    if (!rc)
        rc = o.rc;
    if (rc) {
        free(o.b.p);
        return rc;
    }
    *text = o.b.p;
    return 0;
}
