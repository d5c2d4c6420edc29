#include "spool/bundle.h"
#include "spool/error.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <archive.h>
#include <archive_entry.h>
#include <openssl/evp.h>

#define IO_CHUNK (1 << 20)

static int fail(char *err, size_t errcap, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errcap, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errcap, fmt, ap);
    va_end(ap);
    return code;
}

static void to_hex(const unsigned char *md, char hex[65])
{
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    hex[64] = '\0';
}

int sp_file_sha256(const char *path, char hex[65], uint64_t *size, char *err, size_t errcap)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return fail(err, errcap, SP_ENOENT, "cannot open %s: %s", path, strerror(errno));
    unsigned char *buf = malloc(IO_CHUNK);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (!buf || !md) {
        free(buf);
        EVP_MD_CTX_free(md);
        fclose(f);
        return fail(err, errcap, SP_ENOMEM, "out of memory hashing %s", path);
    }
    EVP_DigestInit_ex(md, EVP_sha256(), NULL);
    uint64_t total = 0;
    size_t n;
    while ((n = fread(buf, 1, IO_CHUNK, f)) > 0) {
        EVP_DigestUpdate(md, buf, n);
        total += n;
    }
    int bad = ferror(f);
    fclose(f);
    free(buf);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned outlen = 0;
    EVP_DigestFinal_ex(md, out, &outlen);
    EVP_MD_CTX_free(md);
    if (bad)
        return fail(err, errcap, SP_EIO, "read error on %s", path);
    to_hex(out, hex);
    if (size)
        *size = total;
    return 0;
}

/* Archive output that hashes what it writes. */
struct pack_out {
    FILE *f;
    EVP_MD_CTX *md;
    uint64_t n;
};

static la_ssize_t pack_write(struct archive *a, void *ud, const void *buf, size_t len)
{
    struct pack_out *o = ud;
    if (fwrite(buf, 1, len, o->f) != len) {
        archive_set_error(a, errno, "write failed");
        return -1;
    }
    EVP_DigestUpdate(o->md, buf, len);
    o->n += len;
    return (la_ssize_t)len;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Lists the regular, non-hidden files of dir, sorted. */
static int list_files(const char *dir, char ***out, size_t *n, char *err, size_t errcap)
{
    DIR *d = opendir(dir);
    if (!d)
        return fail(err, errcap, SP_ENOENT, "cannot open model directory %s: %s", dir,
                    strerror(errno));
    char **names = NULL;
    size_t count = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (count == cap) {
            cap = cap ? 2 * cap : 16;
            names = realloc(names, cap * sizeof *names);
        }
        names[count++] = strdup(e->d_name);
    }
    closedir(d);
    if (count)
        qsort(names, count, sizeof *names, cmp_str);
    *out = names;
    *n = count;
    return 0;
}

int sp_bundle_pack(const char *model_dir, const char *out_path, char hex[65], uint64_t *size,
                   char *err, size_t errcap)
{
    char **names = NULL;
    size_t n = 0;
    int rc = list_files(model_dir, &names, &n, err, errcap);
    if (rc)
        return rc;
    if (n == 0) {
        free(names);
        return fail(err, errcap, SP_ENOENT, "model directory %s has no files", model_dir);
    }
    struct pack_out o = {fopen(out_path, "wb"), EVP_MD_CTX_new(), 0};
    if (!o.f) {
        rc = fail(err, errcap, SP_EIO, "cannot create %s: %s", out_path, strerror(errno));
        goto out;
    }
    EVP_DigestInit_ex(o.md, EVP_sha256(), NULL);
    struct archive *a = archive_write_new();
    archive_write_set_format_pax_restricted(a);
    archive_write_add_filter_zstd(a);
    archive_write_set_filter_option(a, "zstd", "compression-level", "3");
    archive_write_set_bytes_in_last_block(a, 1);
    if (archive_write_open(a, &o, NULL, pack_write, NULL) != ARCHIVE_OK) {
        rc = fail(err, errcap, SP_EIO, "cannot start the bundle: %s", archive_error_string(a));
        archive_write_free(a);
        goto out;
    }
    unsigned char *buf = malloc(IO_CHUNK);
    for (size_t i = 0; i < n && rc == 0; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", model_dir, names[i]);
        FILE *in = fopen(path, "rb");
        struct stat st;
        if (!in || fstat(fileno(in), &st) != 0) {
            rc = fail(err, errcap, SP_EIO, "cannot read %s: %s", path, strerror(errno));
            if (in)
                fclose(in);
            break;
        }
        struct archive_entry *e = archive_entry_new();
        archive_entry_set_pathname(e, names[i]);
        archive_entry_set_size(e, st.st_size);
        archive_entry_set_filetype(e, AE_IFREG);
        archive_entry_set_perm(e, 0644);
        archive_entry_set_mtime(e, 0, 0);
        archive_entry_set_uid(e, 0);
        archive_entry_set_gid(e, 0);
        if (archive_write_header(a, e) != ARCHIVE_OK)
            rc = fail(err, errcap, SP_EIO, "bundling %s: %s", names[i], archive_error_string(a));
        size_t got;
        while (rc == 0 && (got = fread(buf, 1, IO_CHUNK, in)) > 0)
            if (archive_write_data(a, buf, got) != (la_ssize_t)got)
                rc = fail(err, errcap, SP_EIO, "bundling %s: %s", names[i],
                          archive_error_string(a));
        if (rc == 0 && ferror(in))
            rc = fail(err, errcap, SP_EIO, "read error on %s", path);
        fclose(in);
        archive_entry_free(e);
    }
    free(buf);
    if (archive_write_close(a) != ARCHIVE_OK && rc == 0)
        rc = fail(err, errcap, SP_EIO, "finishing the bundle: %s", archive_error_string(a));
    archive_write_free(a);
    if (fflush(o.f) != 0 && rc == 0)
        rc = fail(err, errcap, SP_EIO, "writing %s: %s", out_path, strerror(errno));
    if (rc == 0) {
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned mdlen;
        EVP_DigestFinal_ex(o.md, md, &mdlen);
        to_hex(md, hex);
        if (size)
            *size = o.n;
    }
out:
    if (o.f)
        fclose(o.f);
    EVP_MD_CTX_free(o.md);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    if (rc)
        unlink(out_path);
    return rc;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path) != 0 && errno != ENOENT ? -1 : 0;
}

static void rm_tree(const char *path)
{
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A bundle entry name must be a plain file name. */
static bool safe_name(const char *name)
{
    return name && *name && !strchr(name, '/') && strcmp(name, ".") != 0 &&
           strcmp(name, "..") != 0 && strlen(name) < 256;
}

int sp_bundle_unpack(const char *bundle_path, const char *digest, const char *dest_dir, char *err,
                     size_t errcap)
{
    char hex[65];
    int rc = sp_file_sha256(bundle_path, hex, NULL, err, errcap);
    if (rc)
        return rc;
    if (strcmp(hex, digest) != 0)
        return fail(err, errcap, SP_ECHECKSUM,
                    "bundle %s does not match its digest: expected sha256 %s, the bytes hash to "
                    "%s; refusing to use it (the store copy is damaged or was replaced)",
                    bundle_path, digest, hex);

    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", dest_dir, (int)getpid());
    rm_tree(tmp);
    if (mkdir(tmp, 0755) != 0)
        return fail(err, errcap, SP_EIO, "cannot create %s: %s", tmp, strerror(errno));

    struct archive *a = archive_read_new();
    archive_read_support_filter_zstd(a);
    archive_read_support_format_tar(a);
    if (archive_read_open_filename(a, bundle_path, IO_CHUNK) != ARCHIVE_OK) {
        rc = fail(err, errcap, SP_ECORRUPT, "cannot read bundle %s: %s", bundle_path,
                  archive_error_string(a));
        goto out;
    }
    struct archive_entry *e;
    unsigned char *buf = malloc(IO_CHUNK);
    int r;
    while (rc == 0 && (r = archive_read_next_header(a, &e)) == ARCHIVE_OK) {
        const char *name = archive_entry_pathname(e);
        if (!safe_name(name) || archive_entry_filetype(e) != AE_IFREG) {
            rc = fail(err, errcap, SP_ECORRUPT,
                      "bundle %s holds an entry that is not a plain file (%s); refusing it",
                      bundle_path, name ? name : "(no name)");
            break;
        }
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", tmp, name);
        FILE *out = fopen(path, "wb");
        if (!out) {
            rc = fail(err, errcap, SP_EIO, "cannot create %s: %s", path, strerror(errno));
            break;
        }
        la_ssize_t got;
        while ((got = archive_read_data(a, buf, IO_CHUNK)) > 0)
            if (fwrite(buf, 1, (size_t)got, out) != (size_t)got) {
                rc = fail(err, errcap, SP_EIO, "writing %s: %s", path, strerror(errno));
                break;
            }
        if (got < 0 && rc == 0)
            rc = fail(err, errcap, SP_ECORRUPT, "bundle %s is damaged at %s: %s", bundle_path,
                      name, archive_error_string(a));
        if (fclose(out) != 0 && rc == 0)
            rc = fail(err, errcap, SP_EIO, "writing %s: %s", path, strerror(errno));
    }
    if (rc == 0 && r != ARCHIVE_EOF)
        rc = fail(err, errcap, SP_ECORRUPT, "bundle %s is damaged: %s", bundle_path,
                  archive_error_string(a));
    free(buf);
out:
    archive_read_free(a);
    if (rc == 0 && rename(tmp, dest_dir) != 0) {
        if (errno == EEXIST || errno == ENOTEMPTY) {
            rm_tree(tmp); /* another process unpacked the same digest first */
        } else {
            rc = fail(err, errcap, SP_EIO, "cannot move %s into place: %s", dest_dir,
                      strerror(errno));
        }
    }
    if (rc)
        rm_tree(tmp);
    return rc;
}

/* ---- The directory store ---- */

struct dir_store {
    char root[PATH_MAX];
};

static int copy_file(const char *from, const char *to, char *err, size_t errcap)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", to, (int)getpid());
    FILE *in = fopen(from, "rb");
    if (!in)
        return fail(err, errcap, SP_ENOENT, "cannot open %s: %s", from, strerror(errno));
    FILE *out = fopen(tmp, "wb");
    if (!out) {
        fclose(in);
        return fail(err, errcap, SP_EIO, "cannot create %s: %s", tmp, strerror(errno));
    }
    unsigned char *buf = malloc(IO_CHUNK);
    size_t n;
    int rc = 0;
    while ((n = fread(buf, 1, IO_CHUNK, in)) > 0)
        if (fwrite(buf, 1, n, out) != n) {
            rc = fail(err, errcap, SP_EIO, "writing %s: %s", tmp, strerror(errno));
            break;
        }
    if (rc == 0 && ferror(in))
        rc = fail(err, errcap, SP_EIO, "reading %s", from);
    free(buf);
    fclose(in);
    if (fclose(out) != 0 && rc == 0)
        rc = fail(err, errcap, SP_EIO, "writing %s: %s", tmp, strerror(errno));
    if (rc == 0 && rename(tmp, to) != 0)
        rc = fail(err, errcap, SP_EIO, "cannot rename %s: %s", tmp, strerror(errno));
    if (rc)
        unlink(tmp);
    return rc;
}

static int dir_put(void *ctx, const char *local_path, const char *digest, char *uri,
                   size_t uricap, char *err, size_t errcap)
{
    struct dir_store *s = ctx;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/sha256/%s.tar.zst", s->root, digest);
    if (access(path, F_OK) != 0) {
        int rc = copy_file(local_path, path, err, errcap);
        if (rc)
            return rc;
    }
    snprintf(uri, uricap, "file://%s", path);
    return 0;
}

static int dir_get(void *ctx, const char *uri, const char *dest_path, char *err, size_t errcap)
{
    (void)ctx;
    if (strncmp(uri, "file://", 7) != 0)
        return fail(err, errcap, SP_EUNSUPPORTED,
                    "model store URI %s is not a file:// URI; only directory stores exist so far",
                    uri);
    return copy_file(uri + 7, dest_path, err, errcap);
}

static void dir_free(void *ctx)
{
    free(ctx);
}

static const struct sp_store_i dir_store_i = {dir_put, dir_get, dir_free};

static int mkdir_p(const char *path)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    return mkdir(tmp, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

int sp_store_open(const char *location, struct sp_store *out, char *err, size_t errcap)
{
    char buf[PATH_MAX];
    if (!location || !*location) {
        const char *env = getenv("SPOOL_MODEL_STORE");
        const char *home = getenv("SPOOL_HOME");
        if (env && *env)
            location = env;
        else {
            snprintf(buf, sizeof buf, "%s/models", home && *home ? home : ".spool");
            location = buf;
        }
    }
    if (strncmp(location, "file://", 7) == 0)
        location += 7;
    else if (strstr(location, "://"))
        return fail(err, errcap, SP_EUNSUPPORTED,
                    "model store %s: only directories (or file:// URIs) are supported", location);
    char sub[PATH_MAX];
    snprintf(sub, sizeof sub, "%s/sha256", location);
    if (mkdir_p(sub) != 0)
        return fail(err, errcap, SP_EIO, "cannot create the model store %s: %s", sub,
                    strerror(errno));
    struct dir_store *s = calloc(1, sizeof *s);
    if (!s)
        return fail(err, errcap, SP_ENOMEM, "out of memory");
    if (!realpath(location, s->root)) {
        free(s);
        return fail(err, errcap, SP_EIO, "cannot resolve %s: %s", location, strerror(errno));
    }
    out->i = &dir_store_i;
    out->ctx = s;
    return 0;
}

void sp_store_close(struct sp_store *s)
{
    if (s && s->i) {
        s->i->free(s->ctx);
        s->i = NULL;
        s->ctx = NULL;
    }
}

/* ---- The worker's local cache ---- */

struct cache_entry {
    char name[80];
    uint64_t bytes;
    struct timespec used;
};

static uint64_t dir_bytes(const char *dir)
{
    uint64_t total = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(p, &st) == 0 && S_ISREG(st.st_mode))
            total += (uint64_t)st.st_size;
    }
    if (d)
        closedir(d);
    return total;
}

static int cmp_used(const void *a, const void *b)
{
    const struct cache_entry *x = a, *y = b;
    if (x->used.tv_sec != y->used.tv_sec)
        return x->used.tv_sec < y->used.tv_sec ? -1 : 1;
    return x->used.tv_nsec < y->used.tv_nsec ? -1 : x->used.tv_nsec > y->used.tv_nsec;
}

static void cache_evict(const char *cache_dir, const char *keep, uint64_t limit)
{
    DIR *d = opendir(cache_dir);
    if (!d)
        return;
    struct cache_entry *ents = NULL;
    size_t n = 0, cap = 0;
    uint64_t total = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strlen(e->d_name) != 64 || strspn(e->d_name, "0123456789abcdef") != 64)
            continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", cache_dir, e->d_name);
        struct stat st;
        if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 8;
            ents = realloc(ents, cap * sizeof *ents);
        }
        snprintf(ents[n].name, sizeof ents[n].name, "%s", e->d_name);
        ents[n].bytes = dir_bytes(p);
        ents[n].used = st.st_mtim;
        total += ents[n].bytes;
        n++;
    }
    closedir(d);
    if (n)
        qsort(ents, n, sizeof *ents, cmp_used);
    for (size_t i = 0; i < n && total > limit; i++) {
        if (strcmp(ents[i].name, keep) == 0)
            continue;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", cache_dir, ents[i].name);
        rm_tree(p);
        total -= ents[i].bytes;
    }
    free(ents);
}

int sp_model_cache_fetch(struct sp_store *store, const char *uri, const char *digest,
                         const char *cache_dir, uint64_t limit_bytes, char *out_dir,
                         size_t outcap, char *err, size_t errcap)
{
    if (strlen(digest) != 64 || strspn(digest, "0123456789abcdef") != 64)
        return fail(err, errcap, SP_EINVAL, "model digest '%s' is not a sha256 in hex", digest);
    if (mkdir_p(cache_dir) != 0)
        return fail(err, errcap, SP_EIO, "cannot create the model cache %s: %s", cache_dir,
                    strerror(errno));
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/%s", cache_dir, digest);
    struct stat st;
    if (stat(dir, &st) != 0) {
        char bundle[PATH_MAX];
        snprintf(bundle, sizeof bundle, "%s/%s.tar.zst.%d", cache_dir, digest, (int)getpid());
        int rc = store->i->get(store->ctx, uri, bundle, err, errcap);
        if (rc == 0)
            rc = sp_bundle_unpack(bundle, digest, dir, err, errcap);
        unlink(bundle);
        if (rc)
            return rc;
    }
    utimensat(AT_FDCWD, dir, NULL, 0); /* mark as most recently used */
    if (limit_bytes)
        cache_evict(cache_dir, digest, limit_bytes);
    if ((size_t)snprintf(out_dir, outcap, "%s", dir) >= outcap)
        return fail(err, errcap, SP_ETOOBIG, "cache path too long");
    return 0;
}
