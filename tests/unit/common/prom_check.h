/*
 * A strict checker of Prometheus text exposition format 0.0.4, for tests:
 * stricter than Prometheus's own parser where the format says "must".
 *
 * prom_check(text, err, errcap) returns 0 when text is valid, else -1 with
 * err saying which line and why. It checks: every line ends with '\n';
 * comments are "# HELP name text" (escapes \\ and \n only) or "# TYPE name
 * counter|gauge|histogram|summary|untyped", at most one of each per name,
 * TYPE before the family's samples; sample lines are name{label="value",...}
 * value, with valid metric and label names, label values escaped (\\, \",
 * \n only) and valid UTF-8, a value Prometheus parses (NaN, +Inf, -Inf, a
 * decimal number); a family's samples are contiguous and belong to it
 * (histograms: X_bucket with an le label, X_sum, X_count); no series twice;
 * a histogram's buckets per label set have increasing le, non-decreasing
 * counts, end with le="+Inf", and +Inf equals X_count.
 *
 * Everything is static: include it in one test file.
 */
#ifndef SPOOL_TEST_PROM_CHECK_H
#define SPOOL_TEST_PROM_CHECK_H

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PC_MAX_FAMILIES 128
#define PC_MAX_SERIES   4096

struct pc_family {
    char name[128];
    char type[16];
    bool help, typed, closed; /* closed: its samples ended (another family's began) */
};

struct pc_hist { /* the bucket state of one histogram series (key: name + labels without le) */
    char key[512];
    double last_le, last_count;
    bool inf_seen;
    double inf_count, count;
    bool count_seen;
};

struct pc_state {
    struct pc_family fam[PC_MAX_FAMILIES];
    int n_fam;
    char (*series)[512]; /* every sample's name + labels, to find duplicates */
    int n_series;
    struct pc_hist *hist;
    int n_hist;
    struct pc_family *current; /* the family of the last sample */
    int line;
    char *err;
    size_t errcap;
};

__attribute__((format(printf, 2, 3))) static int pc_fail(struct pc_state *st, const char *fmt, ...)
{
    int n = snprintf(st->err, st->errcap, "line %d: ", st->line);
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < st->errcap)
        vsnprintf(st->err + n, st->errcap - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

static bool pc_name(const char *s, size_t n, bool colon_ok)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                  (c == ':' && colon_ok) || (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

static bool pc_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t k;
        unsigned min, cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf)
            k = 2, min = 0x80;
        else if (c >= 0xe0 && c <= 0xef)
            k = 3, min = 0x800;
        else if (c >= 0xf0 && c <= 0xf4)
            k = 4, min = 0x10000;
        else
            return false;
        if (i + k > n)
            return false;
        cp = c & (0x3fu >> (k - 1));
        for (size_t j = 1; j < k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k;
    }
    return true;
}

/* Parses a sample value as Go's strconv.ParseFloat would accept it here. */
static bool pc_value(const char *s, size_t n, double *out)
{
    char buf[64];
    if (n == 0 || n >= sizeof buf)
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (strcmp(buf, "NaN") == 0) {
        *out = NAN;
        return true;
    }
    if (strcmp(buf, "+Inf") == 0 || strcmp(buf, "-Inf") == 0) {
        *out = buf[0] == '+' ? INFINITY : -INFINITY;
        return true;
    }
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789+-.eE", buf[i]))
            return false;
    char *end;
    *out = strtod(buf, &end);
    return *end == '\0';
}

static struct pc_family *pc_find(struct pc_state *st, const char *name, size_t n)
{
    for (int i = 0; i < st->n_fam; i++)
        if (strlen(st->fam[i].name) == n && memcmp(st->fam[i].name, name, n) == 0)
            return &st->fam[i];
    return NULL;
}

static struct pc_family *pc_add(struct pc_state *st, const char *name, size_t n)
{
    struct pc_family *f = pc_find(st, name, n);
    if (f || st->n_fam == PC_MAX_FAMILIES || n >= sizeof f->name)
        return f;
    f = &st->fam[st->n_fam++];
    memset(f, 0, sizeof *f);
    memcpy(f->name, name, n);
    return f;
}

static int pc_comment(struct pc_state *st, const char *l, size_t n)
{
    if (n < 2 || l[1] != ' ')
        return 0; /* a plain comment */
    bool help = n > 7 && memcmp(l, "# HELP ", 7) == 0;
    bool type = n > 7 && memcmp(l, "# TYPE ", 7) == 0;
    if (!help && !type)
        return 0;
    const char *name = l + 7;
    const char *sp = memchr(name, ' ', n - 7);
    if (!sp)
        return pc_fail(st, "%s without text", help ? "HELP" : "TYPE");
    size_t nn = (size_t)(sp - name);
    if (!pc_name(name, nn, true))
        return pc_fail(st, "bad metric name in a comment");
    struct pc_family *f = pc_add(st, name, nn);
    if (!f)
        return pc_fail(st, "too many families");
    const char *text = sp + 1;
    size_t tn = n - (size_t)(text - l);
    if (help) {
        if (f->help)
            return pc_fail(st, "second HELP for %s", f->name);
        f->help = true;
        for (size_t i = 0; i < tn; i++)
            if (text[i] == '\\' && (i + 1 == tn || (text[i + 1] != '\\' && text[i + 1] != 'n')))
                return pc_fail(st, "bad escape in HELP");
            else if (text[i] == '\\')
                i++;
        if (!pc_utf8((const unsigned char *)text, tn))
            return pc_fail(st, "HELP is not UTF-8");
        return 0;
    }
    if (f->typed)
        return pc_fail(st, "second TYPE for %s", f->name);
    static const char *const types[] = {"counter", "gauge", "histogram", "summary", "untyped"};
    for (size_t i = 0; i < 5; i++)
        if (strlen(types[i]) == tn && memcmp(types[i], text, tn) == 0) {
            snprintf(f->type, sizeof f->type, "%s", types[i]);
            f->typed = true;
            return 0;
        }
    return pc_fail(st, "unknown TYPE");
}

static int pc_sample(struct pc_state *st, const char *l, size_t n)
{
    size_t i = 0;
    while (i < n && l[i] != '{' && l[i] != ' ')
        i++;
    if (!pc_name(l, i, true))
        return pc_fail(st, "bad metric name");
    char name[128];
    if (i >= sizeof name)
        return pc_fail(st, "metric name too long");
    memcpy(name, l, i);
    name[i] = '\0';
    /* The family: the name itself, or a histogram's name + suffix. */
    struct pc_family *f = pc_find(st, name, i);
    const char *suffix = "";
    if (!f || strcmp(f->type, "histogram") == 0) {
        static const char *const sfx[] = {"_bucket", "_sum", "_count"};
        f = NULL;
        for (size_t k = 0; k < 3 && !f; k++) {
            size_t sl = strlen(sfx[k]);
            if (i > sl && strcmp(name + i - sl, sfx[k]) == 0) {
                struct pc_family *g = pc_find(st, name, i - sl);
                if (g && strcmp(g->type, "histogram") == 0) {
                    f = g;
                    suffix = sfx[k];
                }
            }
        }
    }
    if (!f || !f->typed)
        return pc_fail(st, "sample %s has no TYPE before it", name);
    if (f->closed)
        return pc_fail(st, "samples of %s are not contiguous", f->name);
    if (st->current && st->current != f)
        st->current->closed = true;
    st->current = f;

    char key[512], hkey[512], le[64] = "";
    size_t kl = (size_t)snprintf(key, sizeof key, "%s", name);
    size_t hl = (size_t)snprintf(hkey, sizeof hkey, "%s", f->name);
    if (i < n && l[i] == '{') {
        i++;
        char prev[64] = "";
        while (i < n && l[i] != '}') {
            size_t s = i;
            while (i < n && l[i] != '=')
                i++;
            if (!pc_name(l + s, i - s, false) || i - s >= sizeof prev)
                return pc_fail(st, "bad label name");
            char lname[64];
            memcpy(lname, l + s, i - s);
            lname[i - s] = '\0';
            if (strncmp(lname, "__", 2) == 0)
                return pc_fail(st, "reserved label name %s", lname);
            if (prev[0] && strcmp(prev, lname) == 0)
                return pc_fail(st, "label %s twice", lname);
            snprintf(prev, sizeof prev, "%s", lname);
            if (i + 1 >= n || l[i + 1] != '"')
                return pc_fail(st, "label value not quoted");
            i += 2;
            size_t vs = i;
            while (i < n && l[i] != '"') {
                if (l[i] == '\\') {
                    if (i + 1 >= n || !strchr("\\\"n", l[i + 1]))
                        return pc_fail(st, "bad escape in a label value");
                    i++;
                }
                i++;
            }
            if (i >= n)
                return pc_fail(st, "unterminated label value");
            if (!pc_utf8((const unsigned char *)l + vs, i - vs))
                return pc_fail(st, "label value is not UTF-8");
            if (strcmp(lname, "le") == 0 && strcmp(suffix, "_bucket") == 0) {
                if (i - vs >= sizeof le)
                    return pc_fail(st, "le too long");
                memcpy(le, l + vs, i - vs);
                le[i - vs] = '\0';
            } else {
                hl += (size_t)snprintf(hkey + hl, sizeof hkey - hl, "|%s=%.*s", lname,
                                       (int)(i - vs), l + vs);
            }
            kl += (size_t)snprintf(key + kl, sizeof key - kl, "|%s=%.*s", lname, (int)(i - vs),
                                   l + vs);
            if (kl >= sizeof key || hl >= sizeof hkey)
                return pc_fail(st, "labels too long for the checker");
            i++; /* the closing quote */
            if (i < n && l[i] == ',')
                i++;
        }
        if (i >= n)
            return pc_fail(st, "unterminated label set");
        i++; /* } */
    }
    if (i >= n || l[i] != ' ')
        return pc_fail(st, "no space before the value");
    i++;
    const char *vs = l + i;
    const char *sp = memchr(vs, ' ', n - i);
    size_t vn = sp ? (size_t)(sp - vs) : n - i;
    double v;
    if (!pc_value(vs, vn, &v))
        return pc_fail(st, "bad value '%.*s'", (int)vn, vs);
    if (sp) { /* a timestamp: an integer */
        for (const char *p = sp + 1; p < l + n; p++)
            if (!(*p >= '0' && *p <= '9') && !(p == sp + 1 && *p == '-'))
                return pc_fail(st, "bad timestamp");
    }
    for (int k = 0; k < st->n_series; k++)
        if (strcmp(st->series[k], key) == 0)
            return pc_fail(st, "series %s appears twice", key);
    if (st->n_series == PC_MAX_SERIES)
        return pc_fail(st, "too many series for the checker");
    snprintf(st->series[st->n_series++], 512, "%s", key);

    if (strcmp(f->type, "histogram") != 0)
        return 0;
    if (strcmp(suffix, "_bucket") == 0 && !le[0])
        return pc_fail(st, "%s without le", name);
    struct pc_hist *h = NULL;
    for (int k = 0; k < st->n_hist && !h; k++)
        if (strcmp(st->hist[k].key, hkey) == 0)
            h = &st->hist[k];
    if (!h) {
        if (st->n_hist == PC_MAX_SERIES)
            return pc_fail(st, "too many histograms for the checker");
        h = &st->hist[st->n_hist++];
        memset(h, 0, sizeof *h);
        snprintf(h->key, sizeof h->key, "%s", hkey);
        h->last_le = -INFINITY;
    }
    if (strcmp(suffix, "_bucket") == 0) {
        double b;
        if (h->inf_seen)
            return pc_fail(st, "bucket after le=\"+Inf\"");
        if (!pc_value(le, strlen(le), &b) || isnan(b))
            return pc_fail(st, "bad le '%s'", le);
        if (!(b > h->last_le))
            return pc_fail(st, "le %s not increasing", le);
        if (v < h->last_count)
            return pc_fail(st, "bucket counts decrease at le %s", le);
        h->last_le = b;
        h->last_count = v;
        if (isinf(b)) {
            h->inf_seen = true;
            h->inf_count = v;
        }
    } else if (strcmp(suffix, "_count") == 0) {
        h->count = v;
        h->count_seen = true;
    }
    return 0;
}

static int prom_check(const char *text, char *err, size_t errcap)
{
    struct pc_state st = {.err = err, .errcap = errcap};
    st.series = calloc(PC_MAX_SERIES, sizeof *st.series);
    st.hist = calloc(PC_MAX_SERIES, sizeof *st.hist);
    int rc = 0;
    if (!st.series || !st.hist) {
        rc = pc_fail(&st, "out of memory");
        goto out;
    }
    const char *p = text;
    while (*p && rc == 0) {
        st.line++;
        const char *nl = strchr(p, '\n');
        if (!nl) {
            rc = pc_fail(&st, "the last line does not end with a newline");
            break;
        }
        size_t n = (size_t)(nl - p);
        if (n == 0)
            ; /* blank lines are allowed */
        else if (p[0] == '#')
            rc = pc_comment(&st, p, n);
        else
            rc = pc_sample(&st, p, n);
        p = nl + 1;
    }
    for (int k = 0; rc == 0 && k < st.n_hist; k++) {
        const struct pc_hist *h = &st.hist[k];
        if (!h->inf_seen || !h->count_seen || h->inf_count != h->count)
            rc = pc_fail(&st, "histogram %s: +Inf bucket and _count missing or different", h->key);
    }
out:
    free(st.series);
    free(st.hist);
    return rc;
}

#endif
