/*
 * loadgen: the benchmark's load generator, one epoll thread, efficient enough
 * that the forwarder under test (not this program) is the bottleneck.
 *
 *   loadgen connrate HOST PORT CONCURRENCY DURATION_MS
 *       short connections: connect, write 64 B, read the 64 B echo, close.
 *   loadgen rr HOST PORT CONCURRENCY DURATION_MS
 *       persistent connections, one 64 B request/response in flight on each.
 *   loadgen udp HOST PORT SOCKETS DURATION_MS
 *       64 B datagrams from SOCKETS client ports, UDP_WINDOW in flight per port (one,
 *       like a DNS client); a port whose replies stop for UDP_TIMEOUT_NS presumes them
 *       lost and sends again. Loss is what never came back, even late.
 *   loadgen udpshot HOST PORT CONCURRENCY DURATION_MS
 *       one-shot 64 B queries, each from a fresh socket (a new client port, a new flow
 *       for the forwarder), closed after its reply or after UDP_TIMEOUT_NS (lost).
 *
 * Prints one JSON object on stdout: count, errors, seconds, rate, p50_us,
 * p99_us (and sent, lost_pct for udp). Every loop ends at the deadline.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG_SIZE 64
#define MAX_SAMPLES (32u << 20) /* bound memory: later samples are counted, not kept */
#define UDP_WINDOW 1
#define UDP_TIMEOUT_NS 250000000ull
#define UDP_DRAIN_NS 200000000ull

static struct sockaddr_in target;
static uint64_t *samples;
static size_t n_samples, cap_samples;
static uint64_t count, errors;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void record(uint64_t ns) {
    count++;
    if (n_samples == cap_samples) {
        if (cap_samples >= MAX_SAMPLES) return;
        cap_samples = cap_samples ? cap_samples * 2 : 65536;
        samples = realloc(samples, cap_samples * sizeof *samples);
        if (!samples) die("realloc");
    }
    samples[n_samples++] = ns;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double percentile_us(double q) {
    if (n_samples == 0) return -1.0;
    size_t i = (size_t)(q * (double)(n_samples - 1) + 0.5);
    return (double)samples[i] / 1000.0;
}

static void report(double seconds, uint64_t sent) {
    qsort(samples, n_samples, sizeof *samples, cmp_u64);
    printf("{\"count\": %llu, \"errors\": %llu, \"seconds\": %.6f, \"rate\": %.1f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f",
           (unsigned long long)count, (unsigned long long)errors, seconds,
           seconds > 0 ? (double)count / seconds : 0.0, percentile_us(0.50),
           percentile_us(0.99));
    if (sent) {
        double lost = sent > count ? (double)(sent - count) : 0.0;
        printf(", \"sent\": %llu, \"lost_pct\": %.3f", (unsigned long long)sent,
               100.0 * lost / (double)sent);
    }
    printf("}\n");
}

/* ---- TCP: one slot per concurrent connection ---- */

enum state { CONNECTING, WAITING, IDLE };

struct slot {
    int fd;
    enum state st;
    size_t got;
    uint64_t started;
};

static char payload[MSG_SIZE];

static int tcp_connect(int ep, struct slot *s) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) return -1;
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->started = now_ns();
    s->got = 0;
    if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    s->st = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0) die("epoll_ctl");
    return 0;
}

static void slot_close(struct slot *s) {
    if (s->fd >= 0) close(s->fd); /* close() also removes it from the epoll set */
    s->fd = -1;
    s->st = IDLE;
}

static int send_request(int ep, struct slot *s) {
    if (send(s->fd, payload, MSG_SIZE, MSG_NOSIGNAL) != MSG_SIZE) return -1;
    s->st = WAITING;
    s->got = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    return epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
}

/* Returns 1 when a full echo arrived, 0 to wait, -1 on error. */
static int read_echo(struct slot *s) {
    char buf[MSG_SIZE];
    ssize_t n = recv(s->fd, buf, MSG_SIZE - s->got, 0);
    if (n == 0) return -1;
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    s->got += (size_t)n;
    return s->got == MSG_SIZE;
}

static int on_event(int ep, struct slot *s, int persistent) {
    if (s->st == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) return -1;
        s->started = persistent ? now_ns() : s->started;
        return send_request(ep, s);
    }
    int r = read_echo(s);
    if (r <= 0) return r;
    record(now_ns() - s->started);
    if (!persistent) {
        slot_close(s);
        return 0;
    }
    s->started = now_ns();
    return send_request(ep, s);
}

static int run_tcp(int concurrency, uint64_t duration_ns, int persistent) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct slot *slots = calloc((size_t)concurrency, sizeof *slots);
    if (!slots) die("calloc");
    for (int i = 0; i < concurrency; i++) slots[i].fd = -1, slots[i].st = IDLE;
    uint64_t start = now_ns(), deadline = start + duration_ns;
    struct epoll_event events[256];
    for (uint64_t now = start; now < deadline; now = now_ns()) {
        for (int i = 0; i < concurrency; i++) {
            if (slots[i].st != IDLE) continue;
            if (tcp_connect(ep, &slots[i]) < 0) errors++;
        }
        int n = epoll_wait(ep, events, 256, 10);
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            if (on_event(ep, s, persistent) < 0) {
                errors++;
                slot_close(s);
            }
        }
    }
    double seconds = (double)(now_ns() - start) / 1e9;
    for (int i = 0; i < concurrency; i++) slot_close(&slots[i]);
    report(seconds, 0);
    return 0;
}

/* ---- UDP ---- */

struct udp_port {
    int fd;
    int inflight;
    uint64_t last_progress;
};

static void udp_send(struct udp_port *p, uint64_t *sent) {
    char buf[MSG_SIZE] = {0};
    uint64_t t = now_ns();
    memcpy(buf, &t, sizeof t);
    if (send(p->fd, buf, MSG_SIZE, MSG_DONTWAIT) == MSG_SIZE) {
        p->inflight++;
        (*sent)++;
    } else {
        errors++;
    }
}

static void udp_receive(struct udp_port *p, int refill, uint64_t *sent) {
    char buf[2048];
    for (int i = 0; i < 1024; i++) {
        ssize_t n = recv(p->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0) return;
        if (n != MSG_SIZE) continue;
        uint64_t t;
        memcpy(&t, buf, sizeof t);
        uint64_t now = now_ns();
        record(now - t);
        p->last_progress = now;
        if (p->inflight > 0) p->inflight--;
        if (refill) udp_send(p, sent);
    }
}

static int run_udp(int n_ports, uint64_t duration_ns) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct udp_port *ports = calloc((size_t)n_ports, sizeof *ports);
    if (!ports) die("calloc");
    uint64_t sent = 0, start = now_ns(), deadline = start + duration_ns;
    for (int i = 0; i < n_ports; i++) {
        struct udp_port *p = &ports[i];
        p->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (p->fd < 0) die("socket");
        if (connect(p->fd, (struct sockaddr *)&target, sizeof target) < 0) die("connect");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = p};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, p->fd, &ev) < 0) die("epoll_ctl");
        p->last_progress = start;
        for (int w = 0; w < UDP_WINDOW; w++) udp_send(p, &sent);
    }
    struct epoll_event events[256];
    uint64_t now = start;
    while (now < deadline + UDP_DRAIN_NS) {
        int sending = now < deadline;
        int n = epoll_wait(ep, events, 256, 10);
        for (int i = 0; i < n; i++) udp_receive(events[i].data.ptr, sending, &sent);
        now = now_ns();
        for (int i = 0; sending && i < n_ports; i++) {
            struct udp_port *p = &ports[i];
            if (p->inflight >= UDP_WINDOW && now - p->last_progress < UDP_TIMEOUT_NS) continue;
            if (now - p->last_progress >= UDP_TIMEOUT_NS) {
                p->inflight = 0; /* presumed lost; late replies still count */
                p->last_progress = now;
            }
            while (p->inflight < UDP_WINDOW) udp_send(p, &sent);
        }
    }
    report((double)duration_ns / 1e9, sent ? sent : 1);
    return 0;
}

/* ---- UDP one-shot: a fresh client port per query, like a stub resolver ---- */

struct shot {
    int fd;
    uint64_t started;
};

static int shot_open(int ep, struct shot *s) {
    s->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) return -1;
    s->started = now_ns();
    if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 ||
        send(s->fd, payload, MSG_SIZE, MSG_DONTWAIT) != MSG_SIZE) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0) die("epoll_ctl");
    return 0;
}

static void shot_close(struct shot *s) {
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
}

static int run_udp_oneshot(int concurrency, uint64_t duration_ns) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct shot *shots = calloc((size_t)concurrency, sizeof *shots);
    if (!shots) die("calloc");
    for (int i = 0; i < concurrency; i++) shots[i].fd = -1;
    uint64_t sent = 0, start = now_ns(), deadline = start + duration_ns;
    struct epoll_event events[256];
    for (uint64_t now = start; now < deadline; now = now_ns()) {
        for (int i = 0; i < concurrency; i++) {
            struct shot *s = &shots[i];
            if (s->fd >= 0 && now - s->started >= UDP_TIMEOUT_NS) shot_close(s); /* lost */
            if (s->fd >= 0) continue;
            if (shot_open(ep, s) < 0) errors++;
            else sent++;
        }
        int n = epoll_wait(ep, events, 256, 10);
        for (int i = 0; i < n; i++) {
            struct shot *s = events[i].data.ptr;
            char buf[2048];
            ssize_t got = recv(s->fd, buf, sizeof buf, MSG_DONTWAIT);
            if (got == MSG_SIZE) record(now_ns() - s->started);
            else if (got < 0 && errno == EAGAIN) continue;
            else errors++; /* ICMP refused or a wrong size: the query failed */
            shot_close(s);
        }
    }
    double seconds = (double)(now_ns() - start) / 1e9;
    for (int i = 0; i < concurrency; i++) {
        if (shots[i].fd >= 0) sent--; /* still in flight at the deadline: not lost */
        shot_close(&shots[i]);
    }
    report(seconds, sent ? sent : 1);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s connrate|rr|udp|udpshot HOST PORT N DURATION_MS\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &target.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address: %s\n", argv[2]);
        return 2;
    }
    int n = atoi(argv[4]);
    long ms = atol(argv[5]);
    if (n < 1 || n > 100000 || ms < 1 || ms > 3600000) {
        fprintf(stderr, "N must be 1..100000 and DURATION_MS 1..3600000\n");
        return 2;
    }
    memset(payload, 'x', sizeof payload);
    uint64_t duration_ns = (uint64_t)ms * 1000000ull;
    if (strcmp(argv[1], "connrate") == 0) return run_tcp(n, duration_ns, 0);
    if (strcmp(argv[1], "rr") == 0) return run_tcp(n, duration_ns, 1);
    if (strcmp(argv[1], "udp") == 0) return run_udp(n, duration_ns);
    if (strcmp(argv[1], "udpshot") == 0) return run_udp_oneshot(n, duration_ns);
    fprintf(stderr, "unknown mode: %s\n", argv[1]);
    return 2;
}
