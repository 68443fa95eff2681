/* LD_PRELOAD shim for the ingest bench: every file a process closes with fclose() is
 * fsync()ed first (and the directory it lives in, once per close), so dcmtk storescp, which
 * saves each received instance with fopen/fwrite/fclose before it answers the C-STORE, becomes
 * a durable native receiver: the ceiling the node's fsync + commit is compared against.
 * Build: cc -O2 -shared -fPIC -o fsync_on_close.so fsync_on_close.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int (*real_fclose)(FILE *) = NULL;

int fclose(FILE *fp) {
    if (!real_fclose) real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (fp) {
        int fd = fileno(fp);
        int flags = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
        if (flags >= 0 && (flags & O_ACCMODE) != O_RDONLY) {
            char link[64], path[PATH_MAX];
            fflush(fp);
            fsync(fd);
            snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
            ssize_t n = readlink(link, path, sizeof path - 1);
            if (n > 0) {
                path[n] = '\0';
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
