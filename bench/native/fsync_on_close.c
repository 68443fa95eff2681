/* LD_PRELOAD shim for the ingest bench: every file a process closes with fclose() is
 * fsync()ed first (and the directory it lives in, once per close), so dcmtk storescp, which
 * saves each received instance with fopen/fwrite/fclose before it answers the C-STORE, becomes
 * a durable native receiver: the ceiling the node's fsync + commit is compared against.
 *
 * With MAMMO_SHIM_SHA256=1 in the environment the file is also SHA-256 hashed before the
 * fsync (mapped, hashed from the page cache with OpenSSL's EVP SHA-256, which uses the CPU's
 * SHA instructions where there are some): a native receiver that keeps the node's other
 * promise, a content digest of every instance for duplicate detection. libcrypto is opened at
 * run time (dlopen), so the shim builds without OpenSSL's headers; without libcrypto the
 * variable is ignored and the shim writes "sha256 unavailable" to stderr once.
 * Build: cc -O2 -shared -fPIC -o fsync_on_close.so fsync_on_close.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int (*real_fclose)(FILE *) = NULL;

/* The six EVP calls a SHA-256 needs, looked up once in libcrypto. */
static struct {
    int tried, ok;
    void *(*ctx_new)(void);
    const void *(*sha256)(void);
    int (*init)(void *, const void *, void *);
    int (*update)(void *, const void *, size_t);
    int (*final)(void *, unsigned char *, unsigned int *);
    void (*ctx_free)(void *);
} evp;

static int load_evp(void) {
    if (evp.tried) return evp.ok;
    evp.tried = 1;
    void *lib = dlopen("libcrypto.so.3", RTLD_NOW);
    if (!lib) lib = dlopen("libcrypto.so", RTLD_NOW);
    if (lib) {
        evp.ctx_new = (void *(*)(void))dlsym(lib, "EVP_MD_CTX_new");
        evp.sha256 = (const void *(*)(void))dlsym(lib, "EVP_sha256");
        evp.init = (int (*)(void *, const void *, void *))dlsym(lib, "EVP_DigestInit_ex");
        evp.update = (int (*)(void *, const void *, size_t))dlsym(lib, "EVP_DigestUpdate");
        evp.final = (int (*)(void *, unsigned char *, unsigned int *))dlsym(lib,
                                                                        "EVP_DigestFinal_ex");
        evp.ctx_free = (void (*)(void *))dlsym(lib, "EVP_MD_CTX_free");
        evp.ok = evp.ctx_new && evp.sha256 && evp.init && evp.update && evp.final &&
                 evp.ctx_free;
    }
    if (!evp.ok) fputs("fsync_on_close: sha256 unavailable (no libcrypto)\n", stderr);
    return evp.ok;
}

/* SHA-256 of the file at path (opened again for reading: storescp writes with "wb"). The
 * digest is computed, as a receiver would, and dropped (the bench measures the cost);
 * MAMMO_SHIM_SHA256=2 also prints it to stderr, to check it against sha256sum. */
static void hash_file(const char *path, int print) {
    struct stat st;
    if (!load_evp()) return;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    if (fstat(fd, &st) == 0 && st.st_size > 0) {
        void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (map != MAP_FAILED) {
            unsigned char digest[64];
            unsigned int len = 0;
            void *ctx = evp.ctx_new();
            if (ctx) {
                evp.init(ctx, evp.sha256(), NULL);
                evp.update(ctx, map, (size_t)st.st_size);
                evp.final(ctx, digest, &len);
                evp.ctx_free(ctx);
            }
            munmap(map, (size_t)st.st_size);
            if (print) {
                for (unsigned int i = 0; i < len; i++) fprintf(stderr, "%02x", digest[i]);
                fprintf(stderr, "  %s\n", path);
            }
        }
    }
    close(fd);
}

int fclose(FILE *fp) {
    if (!real_fclose) real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (fp) {
        int fd = fileno(fp);
        int flags = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
        if (flags >= 0 && (flags & O_ACCMODE) != O_RDONLY) {
            char link[64], path[PATH_MAX];
            fflush(fp);
            snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
            ssize_t n = readlink(link, path, sizeof path - 1);
            const char *want_hash = getenv("MAMMO_SHIM_SHA256");
            if (n > 0) path[n] = '\0';
            if (n > 0 && want_hash && (want_hash[0] == '1' || want_hash[0] == '2'))
                hash_file(path, want_hash[0] == '2');
            fsync(fd);
            if (n > 0) {
                char *slash = strrchr(path, '/');
                if (slash && slash != path) {
                    *slash = '\0';
                    int dfd = open(path, O_RDONLY | O_DIRECTORY);
                    if (dfd >= 0) { fsync(dfd); close(dfd); }
                }
            }
        }
    }
    return real_fclose(fp);
}
