/*
 * Runs a libFuzzer driver without libFuzzer, so that every driver is also a
 * plain test under gcc and the sanitizers: it feeds each file named on the
 * command line (or every file of a named directory), then a fixed number of
 * pseudo-random mutations of those inputs (seeded, so runs repeat).
 *
 * With -Dfuzz=true the same drivers are also linked with clang's libFuzzer
 * (tests/fuzz/meson.build) for real coverage-guided fuzzing.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct input {
    uint8_t *data;
    size_t size;
};

static struct input *inputs;
static size_t n_inputs, cap_inputs;

static void add_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(sz > 0 ? (size_t)sz : 1);
    if (sz > 0 && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    if (n_inputs == cap_inputs) {
        cap_inputs = cap_inputs ? cap_inputs * 2 : 16;
        inputs = realloc(inputs, cap_inputs * sizeof *inputs);
    }
    inputs[n_inputs++] = (struct input){buf, (size_t)sz};
}

static void add_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", path, e->d_name);
            add_file(p);
        }
        if (d)
            closedir(d);
    } else {
        add_file(path);
    }
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    long mutations = 2000;
    const char *env = getenv("SPOOL_FUZZ_MUTATIONS");
    if (env)
        mutations = atol(env);
    for (int i = 1; i < argc; i++)
        add_path(argv[i]);
    for (size_t i = 0; i < n_inputs; i++)
        LLVMFuzzerTestOneInput(inputs[i].data, inputs[i].size);
    if (n_inputs == 0)
        return 0;
    for (long m = 0; m < mutations; m++) {
        struct input *in = &inputs[rnd() % n_inputs];
        size_t size = in->size + 16;
        uint8_t *buf = malloc(size);
        memcpy(buf, in->data, in->size);
        size_t n = in->size;
        int edits = 1 + (int)(rnd() % 8);
        for (int e = 0; e < edits; e++) {
            switch (rnd() % 4) {
            case 0: /* flip a byte */
                if (n)
                    buf[rnd() % n] ^= (uint8_t)(1u << (rnd() % 8));
                break;
            case 1: /* set a byte to something interesting */
                if (n)
                    buf[rnd() % n] =
                        (uint8_t[]){0, 0xff, 0x7f, 0x80, '"', '{', '}', '\\'}[rnd() % 8];
                break;
            case 2: /* truncate */
                if (n)
                    n = rnd() % n;
                break;
            case 3: /* insert a byte */
                if (n < size) {
                    size_t at = n ? rnd() % n : 0;
                    memmove(buf + at + 1, buf + at, n - at);
                    buf[at] = (uint8_t)rnd();
                    n++;
                }
                break;
            }
        }
        uint8_t *exact = malloc(n ? n : 1); /* exact size, so overreads are caught */
        memcpy(exact, buf, n);
        LLVMFuzzerTestOneInput(exact, n);
        free(exact);
        free(buf);
    }
    for (size_t i = 0; i < n_inputs; i++)
        free(inputs[i].data);
    free(inputs);
    printf("%zu inputs, %ld mutations: no crash\n", n_inputs, mutations);
    return 0;
}
