/*
 * The Prometheus registry and text renderer (spool/prom.h).
 *
 * A family keeps its series in an array in creation order (the render
 * order) and an open-addressing index over a hash of the label values, so
 * that looking a series up costs one hash and, normally, one comparison.
 * A histogram series keeps one count per bucket (not cumulative); the
 * renderer sums them into Prometheus's cumulative buckets.
 */
#include "spool/prom.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool/error.h"

#define DEFAULT_MAX_SERIES 10000

struct series {
    char **values; /* one per label, owned */
    uint64_t hash;
    double value;     /* counter, gauge */
    uint64_t *counts; /* histogram: n_buckets + 1 (the last is +Inf), not cumulative */
    uint64_t count;   /* histogram */
    double sum;       /* histogram */
};

struct sp_prom_family {
    sp_prom_t *reg;
    enum sp_prom_type type;
    char *name, *help;
    char **labels; /* owned, n_labels of them */
    size_t n_labels;
    double *buckets; /* histogram upper bounds, owned */
    size_t n_buckets;
    size_t max_series;
    struct series **series; /* creation order */
    size_t n_series, cap_series;
    uint32_t *index;  /* 0: empty, else 1 + position in series */
    size_t index_cap; /* a power of two, or 0 */
    struct sp_prom_family *next;
};

struct sp_prom {
    struct sp_prom_family *first, *last;
    char errmsg[256];
};

__attribute__((format(printf, 3, 4))) static int fail(sp_prom_t *r, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->errmsg, sizeof r->errmsg, fmt, ap);
    va_end(ap);
    return code;
}

int sp_prom_new(sp_prom_t **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? 0 : SP_ENOMEM;
}

const char *sp_prom_errmsg(const sp_prom_t *r)
{
    return r->errmsg;
}

static void series_free(struct series *s, size_t n_labels)
{
    if (!s)
        return;
    for (size_t i = 0; i < n_labels; i++)
        free(s->values[i]);
    free(s->values);
    free(s->counts);
    free(s);
}

void sp_prom_clear(sp_prom_family_t *f)
{
    for (size_t i = 0; i < f->n_series; i++)
        series_free(f->series[i], f->n_labels);
    f->n_series = 0;
    if (f->index)
        memset(f->index, 0, f->index_cap * sizeof *f->index);
}

static void family_free(struct sp_prom_family *f)
{
    sp_prom_clear(f);
    free(f->series);
    free(f->index);
    for (size_t i = 0; i < f->n_labels; i++)
        free(f->labels[i]);
    free(f->labels);
    free(f->buckets);
    free(f->name);
    free(f->help);
    free(f);
}

void sp_prom_free(sp_prom_t *r)
{
    if (!r)
        return;
    struct sp_prom_family *next;
    for (struct sp_prom_family *f = r->first; f; f = next) {
        next = f->next;
        family_free(f);
    }
    free(r);
}

/* ---- Names ---------------------------------------------------------------- */

static bool name_char(char c, bool first, bool colon_ok)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_')
        return true;
    if (c == ':' && colon_ok)
        return true;
    return !first && c >= '0' && c <= '9';
}

static bool valid_name(const char *s, bool colon_ok)
{
    if (!s || !*s)
        return false;
    for (size_t i = 0; s[i]; i++)
        if (!name_char(s[i], i == 0, colon_ok))
            return false;
    return true;
}

/* ---- Families ------------------------------------------------------------- */

static struct series *series_new(struct sp_prom_family *f, const char *const *values,
                                 uint64_t hash);
static int index_insert(struct sp_prom_family *f, size_t pos);

int sp_prom_family(sp_prom_t *r, const struct sp_prom_spec *spec, sp_prom_family_t **out)
{
    *out = NULL;
    if (!valid_name(spec->name, true))
        return fail(r, SP_EINVAL, "metric name '%s' is not [a-zA-Z_:][a-zA-Z0-9_:]*",
                    spec->name ? spec->name : "(null)");
    if (spec->type != SP_PROM_COUNTER && spec->type != SP_PROM_GAUGE &&
        spec->type != SP_PROM_HISTOGRAM)
        return fail(r, SP_EINVAL, "%s: unknown metric type %d", spec->name, (int)spec->type);
    if (!spec->help || !*spec->help)
        return fail(r, SP_EINVAL, "%s: help text is empty", spec->name);
    for (struct sp_prom_family *g = r->first; g; g = g->next)
        if (strcmp(g->name, spec->name) == 0)
            return fail(r, SP_EEXIST, "metric %s is already registered", spec->name);
    size_t n_labels = 0;
    while (spec->labels && spec->labels[n_labels]) {
        const char *l = spec->labels[n_labels];
        if (!valid_name(l, false) || strncmp(l, "__", 2) == 0)
            return fail(r, SP_EINVAL,
                        "%s: label name '%s' is not [a-zA-Z_][a-zA-Z0-9_]* or starts with __",
                        spec->name, l);
        if (spec->type == SP_PROM_HISTOGRAM && strcmp(l, "le") == 0)
            return fail(r, SP_EINVAL, "%s: a histogram may not have a label named le", spec->name);
        for (size_t j = 0; j < n_labels; j++)
            if (strcmp(spec->labels[j], l) == 0)
                return fail(r, SP_EINVAL, "%s: label %s appears twice", spec->name, l);
        n_labels++;
    }
    if (spec->type == SP_PROM_HISTOGRAM) {
        for (size_t i = 0; i < spec->n_buckets; i++) {
            double b = spec->buckets[i];
            if (!isfinite(b) || (i > 0 && !(b > spec->buckets[i - 1])))
                return fail(r, SP_EINVAL,
                            "%s: bucket bounds must be finite and strictly increasing "
                            "(bound %zu is %g)",
                            spec->name, i, b);
        }
    }

    struct sp_prom_family *f = calloc(1, sizeof *f);
    if (!f)
        return fail(r, SP_ENOMEM, "out of memory");
    f->reg = r;
    f->type = spec->type;
    f->max_series = spec->max_series ? spec->max_series : DEFAULT_MAX_SERIES;
    f->name = strdup(spec->name);
    f->help = strdup(spec->help);
    f->labels = calloc(n_labels ? n_labels : 1, sizeof *f->labels);
    bool ok = f->name && f->help && f->labels;
    for (size_t i = 0; ok && i < n_labels; i++) {
        if ((f->labels[i] = strdup(spec->labels[i])) == NULL)
            ok = false;
        else
            f->n_labels = i + 1;
    }
    if (ok && spec->type == SP_PROM_HISTOGRAM && spec->n_buckets) {
        f->buckets = malloc(spec->n_buckets * sizeof *f->buckets);
        if ((ok = f->buckets != NULL)) {
            memcpy(f->buckets, spec->buckets, spec->n_buckets * sizeof *f->buckets);
            f->n_buckets = spec->n_buckets;
        }
    }
    /* A family without labels always has its single series. */
    if (ok && n_labels == 0) {
        struct series *s = series_new(f, NULL, 0);
        ok = s != NULL;
    }
    if (!ok) {
        family_free(f);
        return fail(r, SP_ENOMEM, "out of memory");
    }
    if (r->last)
        r->last->next = f;
    else
        r->first = f;
    r->last = f;
    *out = f;
    return 0;
}

/* ---- Series lookup -------------------------------------------------------- */

static uint64_t hash_values(const struct sp_prom_family *f, const char *const *values)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < f->n_labels; i++) {
        const char *v = values[i] ? values[i] : "";
        for (; *v; v++) {
            h ^= (unsigned char)*v;
            h *= 1099511628211ull;
        }
        h ^= 0xff; /* a separator; collisions only cost a comparison */
        h *= 1099511628211ull;
    }
    return h;
}

static bool same_values(const struct sp_prom_family *f, const struct series *s,
                        const char *const *values)
{
    for (size_t i = 0; i < f->n_labels; i++)
        if (strcmp(s->values[i], values[i] ? values[i] : "") != 0)
            return false;
    return true;
}

static struct series *find(const struct sp_prom_family *f, const char *const *values, uint64_t hash)
{
    if (f->n_labels == 0)
        return f->n_series ? f->series[0] : NULL;
    if (!f->index_cap)
        return NULL;
    size_t mask = f->index_cap - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        uint32_t slot = f->index[i];
        if (slot == 0)
            return NULL;
        struct series *s = f->series[slot - 1];
        if (s->hash == hash && same_values(f, s, values))
            return s;
    }
}

static int index_insert(struct sp_prom_family *f, size_t pos)
{
    if (f->n_labels == 0)
        return 0;
    /* Keep the load factor under one half. */
    if ((f->n_series + 1) * 2 > f->index_cap) {
        size_t cap = f->index_cap ? f->index_cap * 2 : 16;
        uint32_t *idx = calloc(cap, sizeof *idx);
        if (!idx)
            return SP_ENOMEM;
        free(f->index);
        f->index = idx;
        f->index_cap = cap;
        for (size_t k = 0; k < f->n_series; k++) {
            if (k == pos)
                continue;
            size_t i = f->series[k]->hash & (cap - 1);
            while (idx[i])
                i = (i + 1) & (cap - 1);
            idx[i] = (uint32_t)(k + 1);
        }
    }
    size_t mask = f->index_cap - 1;
    size_t i = f->series[pos]->hash & mask;
    while (f->index[i])
        i = (i + 1) & mask;
    f->index[i] = (uint32_t)(pos + 1);
    return 0;
}

static struct series *series_new(struct sp_prom_family *f, const char *const *values, uint64_t hash)
{
    if (f->n_series == f->cap_series) {
        size_t cap = f->cap_series ? f->cap_series * 2 : 8;
        struct series **a = realloc(f->series, cap * sizeof *a);
        if (!a)
            return NULL;
        f->series = a;
        f->cap_series = cap;
    }
    struct series *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->hash = hash;
    s->values = calloc(f->n_labels ? f->n_labels : 1, sizeof *s->values);
    bool ok = s->values != NULL;
    for (size_t i = 0; ok && i < f->n_labels; i++)
        ok = (s->values[i] = strdup(values[i] ? values[i] : "")) != NULL;
    if (ok && f->type == SP_PROM_HISTOGRAM)
        ok = (s->counts = calloc(f->n_buckets + 1, sizeof *s->counts)) != NULL;
    if (!ok) {
        series_free(s, f->n_labels);
        return NULL;
    }
    f->series[f->n_series] = s;
    if (index_insert(f, f->n_series) != 0) {
        series_free(s, f->n_labels);
        return NULL;
    }
    f->n_series++;
    return s;
}

/* The series for values, created if new; NULL with *rc set on failure. */
static struct series *get(struct sp_prom_family *f, const char *const *values, int *rc)
{
    uint64_t h = f->n_labels ? hash_values(f, values) : 0;
    struct series *s = find(f, values, h);
    if (s)
        return s;
    if (f->n_series >= f->max_series) {
        *rc = fail(f->reg, SP_ETOOBIG, "%s: more than %zu label sets; the new one is dropped",
                   f->name, f->max_series);
        return NULL;
    }
    if ((s = series_new(f, values, h)) == NULL)
        *rc = fail(f->reg, SP_ENOMEM, "out of memory");
    return s;
}

int sp_prom_inc(sp_prom_family_t *f, const char *const *values, double delta)
{
    if (f->type == SP_PROM_HISTOGRAM)
        return fail(f->reg, SP_EINVAL, "%s is a histogram: observe it, do not add", f->name);
    if (!isfinite(delta) || (f->type == SP_PROM_COUNTER && delta < 0))
        return fail(f->reg, SP_EINVAL, "%s: cannot add %g", f->name, delta);
    int rc = 0;
    struct series *s = get(f, values, &rc);
    if (!s)
        return rc;
    s->value += delta;
    return 0;
}

int sp_prom_set(sp_prom_family_t *f, const char *const *values, double value)
{
    if (f->type != SP_PROM_GAUGE)
        return fail(f->reg, SP_EINVAL, "%s is not a gauge: only a gauge is set", f->name);
    int rc = 0;
    struct series *s = get(f, values, &rc);
    if (!s)
        return rc;
    s->value = value;
    return 0;
}

int sp_prom_observe(sp_prom_family_t *f, const char *const *values, double value)
{
    if (f->type != SP_PROM_HISTOGRAM)
        return fail(f->reg, SP_EINVAL, "%s is not a histogram", f->name);
    if (isnan(value))
        return fail(f->reg, SP_EINVAL, "%s: cannot observe NaN", f->name);
    int rc = 0;
    struct series *s = get(f, values, &rc);
    if (!s)
        return rc;
    /* The first bound >= value (binary search); n_buckets is +Inf. */
    size_t lo = 0, hi = f->n_buckets;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (value <= f->buckets[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    s->counts[lo]++;
    s->count++;
    s->sum += value;
    return 0;
}

int sp_prom_get(const sp_prom_family_t *f, const char *const *values, double *out)
{
    uint64_t h = f->n_labels ? hash_values(f, values) : 0;
    const struct series *s = find(f, values, h);
    if (!s)
        return SP_ENOENT;
    *out = f->type == SP_PROM_HISTOGRAM ? (double)s->count : s->value;
    return 0;
}

/* ---- Rendering ------------------------------------------------------------ */

char *sp_prom_format_double(double v, char buf[32])
{
    if (isnan(v))
        return strcpy(buf, "NaN");
    if (isinf(v))
        return strcpy(buf, v > 0 ? "+Inf" : "-Inf");
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        snprintf(buf, 32, "%.0f", v == 0 ? 0.0 : v); /* no "-0" */
        return buf;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, 32, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    return buf;
}

struct buf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void put(struct buf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + n + 1 > cap)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void puts_(struct buf *b, const char *s)
{
    put(b, s, strlen(s));
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when it is not one. */
static size_t utf8_len(const unsigned char *s)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    unsigned min;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef)
        n = 3, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 4, min = 0x10000;
    else
        return 0;
    unsigned cp = c & (0x3f >> (n - 1));
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return n;
}

/*
 * Writes s escaped: backslash and newline always, the double quote in
 * label values (quote true), invalid UTF-8 bytes as U+FFFD.
 */
static void put_escaped(struct buf *b, const char *s, bool quote)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        if (*p == '\\') {
            puts_(b, "\\\\");
            p++;
        } else if (*p == '\n') {
            puts_(b, "\\n");
            p++;
        } else if (*p == '"' && quote) {
            puts_(b, "\\\"");
            p++;
        } else {
            size_t n = utf8_len(p);
            if (n == 0) {
                puts_(b, "\xef\xbf\xbd");
                p++;
            } else {
                put(b, (const char *)p, n);
                p += n;
            }
        }
    }
}

/* name{l1="v1",...[,le="bound"]} value\n */
static void put_sample(struct buf *b, const struct sp_prom_family *f, const struct series *s,
                       const char *suffix, const char *le, double value)
{
    char num[32];
    puts_(b, f->name);
    puts_(b, suffix);
    if (f->n_labels || le) {
        put(b, "{", 1);
        for (size_t i = 0; i < f->n_labels; i++) {
            if (i)
                put(b, ",", 1);
            puts_(b, f->labels[i]);
            put(b, "=\"", 2);
            put_escaped(b, s->values[i], true);
            put(b, "\"", 1);
        }
        if (le) {
            if (f->n_labels)
                put(b, ",", 1);
            puts_(b, "le=\"");
            puts_(b, le);
            put(b, "\"", 1);
        }
        put(b, "}", 1);
    }
    put(b, " ", 1);
    puts_(b, sp_prom_format_double(value, num));
    put(b, "\n", 1);
}

static void put_family(struct buf *b, const struct sp_prom_family *f)
{
    static const char *const type_names[] = {"counter", "gauge", "histogram"};
    puts_(b, "# HELP ");
    puts_(b, f->name);
    put(b, " ", 1);
    put_escaped(b, f->help, false);
    puts_(b, "\n# TYPE ");
    puts_(b, f->name);
    put(b, " ", 1);
    puts_(b, type_names[f->type]);
    put(b, "\n", 1);
    for (size_t k = 0; k < f->n_series; k++) {
        const struct series *s = f->series[k];
        if (f->type != SP_PROM_HISTOGRAM) {
            put_sample(b, f, s, "", NULL, s->value);
            continue;
        }
        uint64_t cum = 0;
        char le[32];
        for (size_t i = 0; i < f->n_buckets; i++) {
            cum += s->counts[i];
            put_sample(b, f, s, "_bucket", sp_prom_format_double(f->buckets[i], le), (double)cum);
        }
        put_sample(b, f, s, "_bucket", "+Inf", (double)s->count);
        put_sample(b, f, s, "_sum", NULL, s->sum);
        put_sample(b, f, s, "_count", NULL, (double)s->count);
    }
}

int sp_prom_render(const sp_prom_t *r, char **out, size_t *len)
{
    struct buf b = {0};
    put(&b, "", 0); /* an empty registry renders as "" */
    for (const struct sp_prom_family *f = r->first; f; f = f->next)
        put_family(&b, f);
    if (b.oom) {
        free(b.p);
        *out = NULL;
        *len = 0;
        return SP_ENOMEM;
    }
    *out = b.p;
    *len = b.len;
    return 0;
}
