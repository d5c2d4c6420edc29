/* Model bundles, the directory store and the worker cache. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <archive.h>
#include <archive_entry.h>
#include <cmocka.h>

#include "spool/bundle.h"
#include "spool/error.h"

static char root[64];

static void put(const char *dir, const char *name, const char *text, size_t repeat)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    for (size_t i = 0; i < repeat; i++)
        fputs(text, f);
    fclose(f);
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static int setup(void **state)
{
    (void)state;
    snprintf(root, sizeof root, "/tmp/spb-XXXXXX");
    assert_non_null(mkdtemp(root));
    char d[128];
    snprintf(d, sizeof d, "%s/model", root);
    mkdir(d, 0755);
    put(d, "config.json", "{\"architectures\": [\"LlamaForCausalLM\"]}", 1);
    put(d, "model.safetensors", "0123456789abcdef", 4096);
    put(d, ".hidden", "skip me", 1);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    return system(cmd);
}

static void pack_is_deterministic_and_round_trips(void **state)
{
    (void)state;
    char model[128], b1[128], b2[128], out[128], err[512];
    snprintf(model, sizeof model, "%s/model", root);
    snprintf(b1, sizeof b1, "%s/b1.tar.zst", root);
    snprintf(b2, sizeof b2, "%s/b2.tar.zst", root);
    char h1[65], h2[65], h3[65];
    uint64_t s1, s2;
    assert_int_equal(sp_bundle_pack(model, b1, h1, &s1, err, sizeof err), 0);
    sleep(1); /* different mtimes must not change the digest */
    put(model, "config.json", "{\"architectures\": [\"LlamaForCausalLM\"]}", 1);
    assert_int_equal(sp_bundle_pack(model, b2, h2, &s2, err, sizeof err), 0);
    assert_string_equal(h1, h2);
    assert_true(s1 == s2 && s1 < 4096 * 16); /* compressed */
    assert_int_equal(sp_file_sha256(b1, h3, NULL, err, sizeof err), 0);
    assert_string_equal(h1, h3);

    snprintf(out, sizeof out, "%s/unpacked", root);
    assert_int_equal(sp_bundle_unpack(b1, h1, out, err, sizeof err), 0);
    char p[256];
    snprintf(p, sizeof p, "%s/config.json", out);
    assert_string_equal(slurp(p), "{\"architectures\": [\"LlamaForCausalLM\"]}");
    snprintf(p, sizeof p, "%s/model.safetensors", out);
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_int_equal(st.st_size, 16 * 4096);
    snprintf(p, sizeof p, "%s/.hidden", out);
    assert_int_not_equal(access(p, F_OK), 0);
}

static void damaged_bundle_is_refused(void **state)
{
    (void)state;
    char model[128], b[128], out[128], err[512], hex[65];
    snprintf(model, sizeof model, "%s/model", root);
    snprintf(b, sizeof b, "%s/bad.tar.zst", root);
    snprintf(out, sizeof out, "%s/bad-out", root);
    assert_int_equal(sp_bundle_pack(model, b, hex, NULL, err, sizeof err), 0);
    FILE *f = fopen(b, "r+b");
    fseek(f, 100, SEEK_SET);
    int c = fgetc(f);
    fseek(f, 100, SEEK_SET);
    fputc(c ^ 0x40, f);
    fclose(f);
    assert_int_equal(sp_bundle_unpack(b, hex, out, err, sizeof err), SP_ECHECKSUM);
    assert_non_null(strstr(err, "does not match its digest"));
    assert_non_null(strstr(err, hex));
    assert_int_not_equal(access(out, F_OK), 0);
}

static void unsafe_entries_are_refused(void **state)
{
    (void)state;
    char b[128], out[128], err[512], hex[65];
    snprintf(b, sizeof b, "%s/evil.tar.zst", root);
    snprintf(out, sizeof out, "%s/evil-out", root);
    struct archive *a = archive_write_new();
    archive_write_set_format_pax_restricted(a);
    archive_write_add_filter_zstd(a);
    assert_int_equal(archive_write_open_filename(a, b), ARCHIVE_OK);
    struct archive_entry *e = archive_entry_new();
    archive_entry_set_pathname(e, "../escape.txt");
    archive_entry_set_size(e, 3);
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0644);
    archive_write_header(a, e);
    archive_write_data(a, "bad", 3);
    archive_entry_free(e);
    archive_write_close(a);
    archive_write_free(a);
    assert_int_equal(sp_file_sha256(b, hex, NULL, err, sizeof err), 0);
    assert_int_equal(sp_bundle_unpack(b, hex, out, err, sizeof err), SP_ECORRUPT);
    assert_non_null(strstr(err, "../escape.txt"));
    char p[128];
    snprintf(p, sizeof p, "%s/escape.txt", root);
    assert_int_not_equal(access(p, F_OK), 0);
}

static void store_and_cache_with_eviction(void **state)
{
    (void)state;
    char store_dir[128], cache[128], err[512], dir[512];
    snprintf(store_dir, sizeof store_dir, "%s/store", root);
    snprintf(cache, sizeof cache, "%s/cache", root);
    struct sp_store st;
    assert_int_equal(sp_store_open(store_dir, &st, err, sizeof err), 0);

    char hexes[3][65], uris[3][512];
    for (int i = 0; i < 3; i++) {
        char m[128], b[128], text[32];
        snprintf(m, sizeof m, "%s/m%d", root, i);
        mkdir(m, 0755);
        snprintf(text, sizeof text, "weights %d ", i);
        put(m, "model.safetensors", text, 20000); /* ~200 KB unpacked */
        snprintf(b, sizeof b, "%s/m%d.tar.zst", root, i);
        assert_int_equal(sp_bundle_pack(m, b, hexes[i], NULL, err, sizeof err), 0);
        assert_int_equal(st.i->put(st.ctx, b, hexes[i], uris[i], sizeof uris[i], err, sizeof err), 0);
        assert_non_null(strstr(uris[i], hexes[i]));
    }
    /* A limit that holds two models: fetching the third evicts the least recently used. */
    uint64_t limit = 450000;
    assert_int_equal(sp_model_cache_fetch(&st, uris[0], hexes[0], cache, limit, dir, sizeof dir, err, sizeof err), 0);
    usleep(20000);
    assert_int_equal(sp_model_cache_fetch(&st, uris[1], hexes[1], cache, limit, dir, sizeof dir, err, sizeof err), 0);
    usleep(20000);
    assert_int_equal(sp_model_cache_fetch(&st, uris[0], hexes[0], cache, limit, dir, sizeof dir, err, sizeof err), 0);
    usleep(20000);
    assert_int_equal(sp_model_cache_fetch(&st, uris[2], hexes[2], cache, limit, dir, sizeof dir, err, sizeof err), 0);
    char p[256];
    snprintf(p, sizeof p, "%s/%s", cache, hexes[0]);
    assert_int_equal(access(p, F_OK), 0);
    snprintf(p, sizeof p, "%s/%s", cache, hexes[1]);
    assert_int_not_equal(access(p, F_OK), 0); /* evicted */
    snprintf(p, sizeof p, "%s/%s/model.safetensors", cache, hexes[2]);
    assert_int_equal(access(p, F_OK), 0);

    /* A wrong digest for a URI is refused. */
    char other[65];
    memcpy(other, hexes[1], 65);
    assert_int_equal(sp_model_cache_fetch(&st, uris[0], other, cache, 0, dir, sizeof dir, err, sizeof err),
                     SP_ECHECKSUM);
    sp_store_close(&st);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(pack_is_deterministic_and_round_trips),
        cmocka_unit_test(damaged_bundle_is_refused),
        cmocka_unit_test(unsafe_entries_are_refused),
        cmocka_unit_test(store_and_cache_with_eviction),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
