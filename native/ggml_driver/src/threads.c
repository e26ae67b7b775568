/*
 * threads.c — the thread count of forward passes (see threads.h for the policy).
 */
#include "threads.h"

#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PROBE_GAP_MIN 8
#define PROBE_GAP_MAX 64
#define SLOWDOWN      1.5  /* passes this much slower than their recent best: look for a better count soon */
#define WIN           0.9  /* a probe must be this much faster than the current count to take over     */
#define BEST_DRIFT    1.01 /* the best time creeps up per pass, following a KV that grows             */

/* ------------------------------------------------------------------------------------------ */
/* The threads this process may use                                                            */
/* ------------------------------------------------------------------------------------------ */

/* Physical cores: distinct (package, core) pairs in /proc/cpuinfo, else online CPUs. */
static int32_t physical_cores(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    int pairs[1024][2], n = 0, pkg = 0;
    if (f) {
        char line[256];
        while (fgets(line, sizeof(line), f)) {
            int v;
            if (sscanf(line, "physical id : %d", &v) == 1) pkg = v;
            else if (sscanf(line, "core id : %d", &v) == 1) {
                bool seen = false;
                for (int i = 0; i < n && !seen; i++) seen = pairs[i][0] == pkg && pairs[i][1] == v;
                if (!seen && n < 1024) { pairs[n][0] = pkg; pairs[n][1] = v; n++; }
            }
        }
        fclose(f);
    }
    if (n > 0) return n;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int32_t)online : 1;
}

/* CPUs in this process's affinity mask (taskset, a container's cpuset), 0 when unknown. */
static int32_t affinity_cpus(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
    return 0;
}

/* The cgroup CPU quota in CPUs, rounded up (cgroup v2 cpu.max, else v1 cfs quota); 0 = none. */
static int32_t quota_cpus(void) {
    long long quota = -1, period = 0;
    FILE *f = fopen("/sys/fs/cgroup/cpu.max", "r");
    if (f) {
        char q[32];
        if (fscanf(f, "%31s %lld", q, &period) == 2 && strcmp(q, "max") != 0) sscanf(q, "%lld", &quota);
        fclose(f);
    } else if ((f = fopen("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "r"))) {
        if (fscanf(f, "%lld", &quota) != 1) quota = -1;
        fclose(f);
        if ((f = fopen("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "r"))) {
            if (fscanf(f, "%lld", &period) != 1) period = 0;
            fclose(f);
        }
    }
    if (quota <= 0 || period <= 0) return 0;
    return (int32_t)((quota + period - 1) / period);
}

int32_t pie_threads_allowed(void) {
    int32_t n = physical_cores();
    const int32_t affinity = affinity_cpus(), quota = quota_cpus();
    if (affinity > 0 && affinity < n) n = affinity;
    if (quota > 0 && quota < n) n = quota;
    if (n > PIE_THREADS_MAX) n = PIE_THREADS_MAX;
    return n > 0 ? n : 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Adapting to the load                                                                        */
/* ------------------------------------------------------------------------------------------ */

void pie_threads_init(pie_threads *t, int32_t n, bool adaptive) {
    memset(t, 0, sizeof(*t));
    t->n = t->running = t->max = n > 0 ? n : 1;
    t->adaptive = adaptive && t->max > 1 && t->max <= PIE_THREADS_MAX;
    t->until_probe = PROBE_GAP_MIN;
    t->probe_gap = PROBE_GAP_MIN;
    t->direction = -1;
}

int64_t pie_threads_shape_key(int32_t n_tokens, int32_t n_outputs) {
    return ((int64_t)n_tokens << 32 | (uint32_t)n_outputs) + 1; /* never 0 (a free slot) */
}

/* The slot of shape key, taking over the least recently seen one for a new shape. */
static int32_t shape_slot(pie_threads *t, int64_t key) {
    int32_t oldest = 0;
    for (int32_t i = 0; i < PIE_THREADS_SHAPES; i++) {
        if (t->shapes[i].key == key) return i;
        if (t->shapes[i].seen < t->shapes[oldest].seen) oldest = i;
    }
    memset(&t->shapes[oldest], 0, sizeof(t->shapes[oldest]));
    t->shapes[oldest].key = key;
    return oldest;
}

int32_t pie_threads_begin(pie_threads *t, int64_t shape_key) {
    t->step++;
    t->running = t->n;
    if (!t->adaptive) return t->n;
    t->slot = shape_slot(t, shape_key);
    pie_threads_shape *s = &t->shapes[t->slot];
    s->seen = t->step;
    /* probe once this shape has two passes at n to compare with (the first may pay one-off
     * costs: compute buffers, page faults) */
    if (t->until_probe <= 0 && s->samples[t->n] >= 2) {
        int32_t c = t->n + t->direction;
        if (c < 1 || c > t->max) {
            t->direction = -t->direction;
            c = t->n + t->direction;
        }
        t->running = c;
    }
    return t->running;
}

void pie_threads_end(pie_threads *t, double seconds) {
    if (!t->adaptive || !(seconds > 0.0)) return;
    pie_threads_shape *s = &t->shapes[t->slot];
    const int32_t c = t->running;
    /* smoothed time, and the best of the smoothed times (single passes are noisy) */
    s->recent[c] = s->samples[c] ? 0.5 * s->recent[c] + 0.5 * seconds : seconds;
    s->best[c] = s->samples[c] && s->best[c] * BEST_DRIFT < s->recent[c] ? s->best[c] * BEST_DRIFT : s->recent[c];
    s->samples[c]++;
    if (c == t->n) {
        t->until_probe--;
        if (s->recent[c] > SLOWDOWN * s->best[c] && t->until_probe > 1) {
            t->until_probe = 1; /* something else took our cores: try fewer threads soon */
            t->direction = -1;
        }
        return;
    }
    if (seconds < WIN * s->recent[t->n]) { /* the probe won: move, and keep looking that way */
        t->n = c;
        t->probe_gap = PROBE_GAP_MIN;
    } else { /* it lost: accept the current level as the new normal, probe the other way, later */
        s->best[t->n] = s->recent[t->n];
        t->probe_gap = t->probe_gap * 2 > PROBE_GAP_MAX ? PROBE_GAP_MAX : t->probe_gap * 2;
        t->direction = -t->direction;
    }
    t->until_probe = t->probe_gap;
}

double pie_threads_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
