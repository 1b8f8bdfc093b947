/* LD_PRELOAD shim for tests: CLOCK_REALTIME runs JG_CLOCK_SKEW_NS (> 0) ahead in the process it is loaded into, as on a
 * host whose NTP is off. Built by tests/integration/test_clock_skew.py with the machine's gcc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static long long skew_ns;

__attribute__((constructor)) static void init(void) {
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    const char *s = getenv("JG_CLOCK_SKEW_NS");
    skew_ns = s ? atoll(s) : 0;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int r = real_clock_gettime(id, ts);
    if (r == 0 && id == CLOCK_REALTIME && skew_ns > 0) {
        long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + skew_ns;
        ts->tv_sec = ns / 1000000000LL;
        ts->tv_nsec = ns % 1000000000LL;
    }
    return r;
}
