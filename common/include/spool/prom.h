/*
 * A small Prometheus metrics registry and its text exposition (format
 * 0.0.4): counters, gauges and histograms, each a family of series told
 * apart by label values.
 *
 * A registry holds families in registration order; a family holds series in
 * the order they were first touched. sp_prom_render writes them in that
 * order:
 *
 *   # HELP spool_requests_total Requests answered.
 *   # TYPE spool_requests_total counter
 *   spool_requests_total{lane="live",status="200"} 3
 *
 * and for a histogram, per series, one cumulative _bucket line per upper
 * bound (le="..."), then le="+Inf", _sum and _count. Label values are
 * escaped (backslash, double quote, newline) and invalid UTF-8 is replaced
 * by U+FFFD, so any bytes may be given as a label value.
 *
 * Memory: the registry owns its families and series; label values are
 * copied. Families live until sp_prom_free. Nothing here is thread-safe:
 * one thread (or a caller's lock) at a time.
 */
#ifndef SPOOL_PROM_H
#define SPOOL_PROM_H

#include <stddef.h>

typedef struct sp_prom sp_prom_t;
typedef struct sp_prom_family sp_prom_family_t;

enum sp_prom_type { SP_PROM_COUNTER, SP_PROM_GAUGE, SP_PROM_HISTOGRAM };

struct sp_prom_spec {
    enum sp_prom_type type;
    const char *name; /* [a-zA-Z_:][a-zA-Z0-9_:]* */
    const char *help; /* one line or more (escaped when rendered); not empty */
    /* Label names, NULL-terminated ([a-zA-Z_][a-zA-Z0-9_]*, not "__..."; "le"
     * is reserved in histograms); NULL: no labels. */
    const char *const *labels;
    /* Histograms: bucket upper bounds, finite and strictly increasing; the
     * +Inf bucket is implied. Ignored for other types. */
    const double *buckets;
    size_t n_buckets;
    /* At most this many series (label sets); 0: 10,000. A new label set past
     * the limit is refused with SP_ETOOBIG, which keeps a family whose
     * values come from outside from growing without bound. */
    size_t max_series;
};

/* A new empty registry. Returns 0 or SP_ENOMEM. */
int sp_prom_new(sp_prom_t **out);
/* Frees the registry and every family and series in it. NULL is fine. */
void sp_prom_free(sp_prom_t *r);
/* Why the last failing call on r (or one of its families) failed. */
const char *sp_prom_errmsg(const sp_prom_t *r);

/*
 * Adds a family. Returns 0 and sets *out (owned by r); SP_EINVAL for a bad
 * name, help, label name or bucket list; SP_EEXIST for a name already
 * registered; SP_ENOMEM. sp_prom_errmsg says which. A family without
 * labels has its one series from the start (rendered as 0).
 */
int sp_prom_family(sp_prom_t *r, const struct sp_prom_spec *spec, sp_prom_family_t **out);

/*
 * The series functions take one label value per label name, in the
 * family's order (values may be NULL when the family has no labels; a NULL
 * value is the empty string). Each returns 0; SP_EINVAL for a value the
 * type does not allow (see each) or the wrong family type; SP_ETOOBIG past
 * max_series; SP_ENOMEM.
 */
/* Counters: adds delta (finite, >= 0). Gauges: adds delta (finite). */
int sp_prom_inc(sp_prom_family_t *f, const char *const *values, double delta);
/* Gauges only: sets the value (any double, NaN and infinities included). */
int sp_prom_set(sp_prom_family_t *f, const char *const *values, double value);
/* Histograms only: counts value (not NaN) in the first bucket whose bound is >= value. */
int sp_prom_observe(sp_prom_family_t *f, const char *const *values, double value);
/* Drops every series of f (gauges recomputed at each scrape start from empty). */
void sp_prom_clear(sp_prom_family_t *f);

/*
 * Reads one series' value back (counter, gauge) or, for a histogram, its
 * count; *out is set. Returns 0, or SP_ENOENT when the series does not exist.
 */
int sp_prom_get(const sp_prom_family_t *f, const char *const *values, double *out);

/*
 * Renders every family as text format 0.0.4 into a new NUL-terminated
 * buffer *out (the caller frees it) of *len bytes. Returns 0 or SP_ENOMEM.
 */
int sp_prom_render(const sp_prom_t *r, char **out, size_t *len);

/*
 * Writes v as Prometheus writes a sample value: "NaN", "+Inf", "-Inf",
 * integers below 2^53 without exponent or point ("42"), and other values
 * in the shortest form that reads back as the same double ("0.25",
 * "1e-06"). buf must hold 32 bytes. Returns buf.
 */
char *sp_prom_format_double(double v, char buf[32]);

#endif
