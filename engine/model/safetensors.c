/* safetensors parsing and mapping; see safetensors.h. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "spool/error.h"

size_t se__dtype_size(enum se_dtype t)
{
    return t == SE_DTYPE_F32 ? 4 : 2;
}

void se__st_free_tensors(struct se_tensor *tensors, int n)
{
    if (!tensors)
        return;
    for (int i = 0; i < n; i++)
        free((char *)tensors[i].name);
    free(tensors);
}

static int parse_dtype(const char *s, enum se_dtype *t)
{
    if (!strcmp(s, "F32"))
        *t = SE_DTYPE_F32;
    else if (!strcmp(s, "F16"))
        *t = SE_DTYPE_F16;
    else if (!strcmp(s, "BF16"))
        *t = SE_DTYPE_BF16;
    else
        return -1;
    return 0;
}

/* Reads a non-negative JSON integer; JSON reals and negatives are rejected. */
static int get_u64(json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

struct range {
    uint64_t begin, end;
    int idx;
};

static int cmp_range(const void *a, const void *b)
{
    const struct range *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int parse_one(const char *name, json_t *info, const uint8_t *data, uint64_t data_size,
                     struct se_tensor *t, struct range *r, char *err, size_t errcap)
{
    json_t *dt = json_object_get(info, "dtype");
    json_t *shape = json_object_get(info, "shape");
    json_t *offs = json_object_get(info, "data_offsets");
    if (!json_is_object(info) || !json_is_string(dt) || !json_is_array(shape) ||
        !json_is_array(offs) || json_array_size(offs) != 2) {
        snprintf(err, errcap,
                 "tensor %s: header entry needs dtype, shape and data_offsets [begin, end]", name);
        return SP_ECORRUPT;
    }
    if (parse_dtype(json_string_value(dt), &t->dtype)) {
        snprintf(err, errcap, "tensor %s: unsupported dtype %s (supported: F32, F16, BF16)", name,
                 json_string_value(dt));
        return SP_EUNSUPPORTED;
    }
    size_t nd = json_array_size(shape);
    if (nd > 4) {
        snprintf(err, errcap, "tensor %s: %zu dimensions (at most 4 supported)", name, nd);
        return SP_EUNSUPPORTED;
    }
    uint64_t count = 1;
    t->n_dims = (int)nd;
    for (size_t d = 0; d < 4; d++)
        t->shape[d] = 0;
    for (size_t d = 0; d < nd; d++) {
        uint64_t dim;
        if (get_u64(json_array_get(shape, d), &dim) || dim > (1ull << 40)) {
            snprintf(err, errcap, "tensor %s: shape[%zu] is not a valid dimension", name, d);
            return SP_ECORRUPT;
        }
        t->shape[d] = (int64_t)dim;
        if (dim && count > (1ull << 50) / dim) {
            snprintf(err, errcap, "tensor %s: shape too large", name);
            return SP_ECORRUPT;
        }
        count *= dim;
    }
    uint64_t begin, end;
    if (get_u64(json_array_get(offs, 0), &begin) || get_u64(json_array_get(offs, 1), &end) ||
        end < begin) {
        snprintf(err, errcap, "tensor %s: data_offsets must be [begin, end] with begin <= end",
                 name);
        return SP_ECORRUPT;
    }
    if (end > data_size) {
        snprintf(err, errcap,
                 "tensor %s: data_offsets [%llu, %llu] run past the end of the data (%llu bytes): "
                 "the file is truncated",
                 name, (unsigned long long)begin, (unsigned long long)end,
                 (unsigned long long)data_size);
        return SP_ECORRUPT;
    }
    uint64_t want = count * se__dtype_size(t->dtype);
    if (end - begin != want) {
        snprintf(err, errcap,
                 "tensor %s: data_offsets cover %llu bytes but shape x element size is %llu", name,
                 (unsigned long long)(end - begin), (unsigned long long)want);
        return SP_ECORRUPT;
    }
    t->data = data + begin;
    t->nbytes = (size_t)want;
    r->begin = begin;
    r->end = end;
    return 0;
}

int se__st_parse(const uint8_t *buf, size_t size, struct se_tensor **tensors, int *n, char *err,
                 size_t errcap)
{
    *tensors = NULL;
    *n = 0;
    if (size < 8) {
        snprintf(err, errcap, "file too short for a safetensors header (%zu bytes)", size);
        return SP_ECORRUPT;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | buf[i];
    if (hlen > SE_ST_MAX_HEADER || hlen > size - 8) {
        snprintf(err, errcap, "header length %llu exceeds the file (%zu bytes) or the 100 MB limit",
                 (unsigned long long)hlen, size);
        return SP_ECORRUPT;
    }
    json_error_t je;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        snprintf(err, errcap, "header is not valid JSON: %s (column %d)", je.text, je.column);
        return SP_ECORRUPT;
    }
    int rc = 0;
    struct range *ranges = NULL;
    struct se_tensor *ts = NULL;
    int count = 0;
    if (!json_is_object(root)) {
        snprintf(err, errcap, "header is not a JSON object");
        rc = SP_ECORRUPT;
        goto out;
    }
    size_t cap = json_object_size(root);
    ts = calloc(cap ? cap : 1, sizeof(*ts));
    ranges = calloc(cap ? cap : 1, sizeof(*ranges));
    if (!ts || !ranges) {
        rc = SP_ENOMEM;
        snprintf(err, errcap, "out of memory");
        goto out;
    }
    const uint8_t *data = buf + 8 + hlen;
    uint64_t data_size = size - 8 - hlen;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val)
    {
        if (!strcmp(key, "__metadata__"))
            continue;
        rc = parse_one(key, val, data, data_size, &ts[count], &ranges[count], err, errcap);
        if (rc)
            goto out;
        ts[count].name = strdup(key);
        if (!ts[count].name) {
            rc = SP_ENOMEM;
            goto out;
        }
        ranges[count].idx = count;
        count++;
    }
    qsort(ranges, (size_t)count, sizeof(*ranges), cmp_range);
    for (int i = 1; i < count; i++) {
        /* Empty tensors occupy no bytes and cannot overlap anything. */
        if (ranges[i].begin == ranges[i].end)
            continue;
        if (ranges[i].begin < ranges[i - 1].end) {
            snprintf(err, errcap, "tensors %s and %s have overlapping data_offsets",
                     ts[ranges[i - 1].idx].name, ts[ranges[i].idx].name);
            rc = SP_ECORRUPT;
            goto out;
        }
    }
out:
    free(ranges);
    json_decref(root);
    if (rc) {
        se__st_free_tensors(ts, count);
        return rc;
    }
    *tensors = ts;
    *n = count;
    return 0;
}

int se__st_open(const char *path, struct se_st_file *f, char *err, size_t errcap)
{
    memset(f, 0, sizeof(*f));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errcap, "%s: %s", path, strerror(errno));
        return errno == ENOENT ? SP_ENOENT : SP_EIO;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        snprintf(err, errcap, "%s: %s", path, strerror(errno));
        close(fd);
        return SP_EIO;
    }
    f->size = (size_t)st.st_size;
    if (f->size > 0) {
        f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (f->map == MAP_FAILED) {
            f->map = NULL;
            snprintf(err, errcap, "%s: mmap: %s", path, strerror(errno));
            close(fd);
            return SP_EIO;
        }
    }
    close(fd);
    f->path = strdup(path);
    char msg[512];
    int rc = se__st_parse(f->map, f->size, &f->tensors, &f->n_tensors, msg, sizeof(msg));
    if (rc == 0 && !f->path)
        rc = SP_ENOMEM, snprintf(msg, sizeof(msg), "out of memory");
    if (rc) {
        snprintf(err, errcap, "%s: %s", path, msg);
        se__st_close(f);
        return rc;
    }
    return 0;
}

void se__st_close(struct se_st_file *f)
{
    se__st_free_tensors(f->tensors, f->n_tensors);
    if (f->map)
        munmap(f->map, f->size);
    free(f->path);
    memset(f, 0, sizeof(*f));
}
