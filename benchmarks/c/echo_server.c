/*
 * echo_server: the benchmark's backend. One epoll thread serves TCP echo and
 * UDP echo on 127.0.0.1.
 *
 * TCP: everything read is written back; on EOF from the peer (a half-close)
 * the server finishes echoing what it holds and then closes, which is what the
 * harness's 1 MiB half-close check relies on. A partial write parks the rest
 * and stops reading that connection until it drains, so memory stays bounded.
 * UDP: every datagram goes back to its sender, read and written in batches
 * (recvmmsg/sendmmsg) so the backend is not the bottleneck.
 *
 * usage: echo_server TCP_PORT UDP_PORT
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define UDP_BATCH 64
#define UDP_DGRAM_MAX 2048
#define MAX_EVENTS 256

struct conn {
    int fd;
    char *pending;      /* bytes read but not yet written back */
    size_t pending_len;
    size_t pending_off;
};

static char scratch[BUF_SIZE];
static int udp_fd = -1;
static int tcp_fd = -1;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int listen_on(int type, int port) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (type == SOCK_DGRAM) {
        int size = 4 << 20;
        /* FORCE works as root and ignores rmem_max; fall back silently. */
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (type == SOCK_STREAM && listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void conn_close(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
}

static void watch(int ep, int op, struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void accept_all(int ep) {
    for (int i = 0; i < 256; i++) {
        int fd = accept4(tcp_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or a transient error: retry on the next event */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        watch(ep, EPOLL_CTL_ADD, c, EPOLLIN);
    }
}

/* Returns 0 to keep the connection, -1 to close it. */
static int on_readable(int ep, struct conn *c) {
    ssize_t n = read(c->fd, scratch, sizeof scratch);
    if (n == 0) return -1; /* peer half-closed and nothing is pending: done */
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    ssize_t w = send(c->fd, scratch, (size_t)n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN) return -1;
        w = 0;
    }
    if (w < n) {
        c->pending_len = (size_t)(n - w);
        c->pending_off = 0;
        c->pending = malloc(c->pending_len);
        if (!c->pending) die("malloc");
        memcpy(c->pending, scratch + w, c->pending_len);
        watch(ep, EPOLL_CTL_MOD, c, EPOLLOUT);
    }
    return 0;
}

static int on_writable(int ep, struct conn *c) {
    ssize_t w = send(c->fd, c->pending + c->pending_off, c->pending_len - c->pending_off,
                     MSG_NOSIGNAL);
    if (w < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    c->pending_off += (size_t)w;
    if (c->pending_off == c->pending_len) {
        free(c->pending);
        c->pending = NULL;
        watch(ep, EPOLL_CTL_MOD, c, EPOLLIN);
    }
    return 0;
}

static void udp_echo(void) {
    static char bufs[UDP_BATCH][UDP_DGRAM_MAX];
    static struct sockaddr_in addrs[UDP_BATCH];
    struct mmsghdr msgs[UDP_BATCH];
    struct iovec iovs[UDP_BATCH];
    for (int round = 0; round < 64; round++) { /* bounded so TCP is not starved */
        for (int i = 0; i < UDP_BATCH; i++) {
            iovs[i].iov_base = bufs[i];
            iovs[i].iov_len = UDP_DGRAM_MAX;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
        }
        int n = recvmmsg(udp_fd, msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        for (int i = 0; i < n; i++) iovs[i].iov_len = msgs[i].msg_len;
        /* A full send buffer drops replies, like any UDP server; the client counts loss. */
        sendmmsg(udp_fd, msgs, (unsigned)n, MSG_DONTWAIT);
        if (n < UDP_BATCH) return;
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TCP_PORT UDP_PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    tcp_fd = listen_on(SOCK_STREAM, atoi(argv[1]));
    udp_fd = listen_on(SOCK_DGRAM, atoi(argv[2]));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    /* The two listeners are told apart by these sentinel pointers. */
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &tcp_fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, tcp_fd, &ev) < 0) die("epoll_ctl");
    ev.data.ptr = &udp_fd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, udp_fd, &ev) < 0) die("epoll_ctl");
    printf("ready\n");
    fflush(stdout);
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            void *p = events[i].data.ptr;
            if (p == &tcp_fd) {
                accept_all(ep);
                continue;
            }
            if (p == &udp_fd) {
                udp_echo();
                continue;
            }
            struct conn *c = p;
            int rc = c->pending ? on_writable(ep, c) : on_readable(ep, c);
            if (rc < 0 || (events[i].events & EPOLLERR)) conn_close(ep, c);
        }
    }
}
