/*
 * kguest: the workloads of the Kemari test guest, one static multi-call program.
 *
 *   kguest ticks [--interval-ms N]
 *       print "tick N" (N = 1, 2, ...) every 200 ms, one flushed line each.
 *   kguest records [--dir DIR] [--listen ADDR] [--port N]
 *       line-protocol record store on TCP (default 0.0.0.0:7000) backed by
 *       DIR/records.log (default /data); see docs/guest.md for the protocol.
 *   kguest diskload [--dir DIR] [--blocks N] [--sync-every K] [--count C]
 *       endless (or C) checksummed block writes rotating over DIR/diskload.bin.
 *   kguest diskload-verify [--dir DIR]
 *       check DIR/diskload.bin; prints "diskload-verify: OK ..." or "... FAIL ...".
 *
 * kguest never reboots anything itself: REBOOT and POWEROFF make "records"
 * exit with status 100 and 101, and the guest's init (PID 1) acts on that.
 * This keeps the binary safe to run on the host, where the tests run it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXIT_REBOOT 100
#define EXIT_POWEROFF 101

/* ---------------------------------------------------------------- common */

static const char *progname = "kguest";

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", progname);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n);
	if (!q)
		die("out of memory");
	return q;
}

static uint32_t crc_table[256];

static void crc32_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

/* CRC-32 (IEEE 802.3), the same function as zlib's crc32(). */
static uint32_t crc32_update(uint32_t crc, const void *buf, size_t len)
{
	const unsigned char *p = buf;
	crc = ~crc;
	while (len--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

static long parse_long(const char *what, const char *s, long lo, long hi)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		die("invalid %s '%s' (expected %ld..%ld)", what, s, lo, hi);
	return v;
}

static char *join_path(const char *dir, const char *name)
{
	size_t n = strlen(dir) + strlen(name) + 2;
	char *p = xrealloc(NULL, n);
	snprintf(p, n, "%s/%s", dir, name);
	return p;
}

/* Make a newly created directory entry durable. */
static void fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0)
		die("fsync %s: %s", dir, strerror(errno));
	close(fd);
}

static void require_dir(const char *dir)
{
	struct stat st;
	if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
		die("data directory %s is missing (is the data disk attached and mounted?)", dir);
}

static void ready(const char *workload, const char *detail)
{
	printf("kemari-guest: workload %s ready%s%s\n", workload, *detail ? " " : "", detail);
	fflush(stdout);
}

/* ---------------------------------------------------------------- ticks */

static int cmd_ticks(int argc, char **argv)
{
	long interval_ms = 200;
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--interval-ms") && i + 1 < argc)
			interval_ms = parse_long("interval", argv[++i], 1, 3600000);
		else
			die("ticks: unknown argument '%s'", argv[i]);
	}
	ready("ticks", "");
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (uint64_t n = 1;; n++) {
		printf("tick %" PRIu64 "\n", n);
		fflush(stdout);
		/* Absolute deadlines: the cadence does not drift with print time. */
		next.tv_nsec += interval_ms % 1000 * 1000000L;
		next.tv_sec += interval_ms / 1000 + next.tv_nsec / 1000000000L;
		next.tv_nsec %= 1000000000L;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
			;
	}
}

/* ---------------------------------------------------------------- records */

/*
 * records.log holds one line per record: "<seq> <crc32 as 8 hex> <payload>\n",
 * the CRC taken over "<seq> <payload>".  Seqs start at 1 and increase by one.
 * Appends are serialized by the single-threaded poll loop; every reply is held
 * back until the fsync covering the appends before it has returned, so an
 * acknowledged record is on disk.  Only the trailing record can be torn by a
 * crash; recovery drops it.
 */

#define MAX_PAYLOAD 4096
#define MAX_LINE (MAX_PAYLOAD + 16)
#define MAX_CLIENTS 1024
#define MAX_PENDING_OUT (1 << 20)

struct buf {
	char *data;
	size_t len, cap;
};

static void buf_append(struct buf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + n)
			cap *= 2;
		b->data = xrealloc(b->data, cap);
		b->cap = cap;
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

static void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_printf(struct buf *b, const char *fmt, ...)
{
	char tmp[128];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	buf_append(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

static void buf_consume(struct buf *b, size_t n)
{
	memmove(b->data, b->data + n, b->len - n);
	b->len -= n;
}

struct client {
	int fd;
	struct buf in, out;
	int closing; /* close once out is drained */
};

struct store {
	const char *dir;
	char *path;
	int fd;
	uint64_t count;  /* records in the file; the last seq */
	off_t size;      /* bytes of complete records */
	int dirty;       /* appended since the last fsync */
};

/*
 * Parse one record line (without its '\n') at p[0..len).  Returns 1 and sets
 * *seq, *payload, *payload_len when the line is a well-formed record with a
 * matching checksum, else 0.
 */
static int parse_record(const char *p, size_t len, uint64_t *seq, const char **payload,
			size_t *payload_len)
{
	char num[24];
	size_t i = 0;
	while (i < len && i < 20 && p[i] >= '0' && p[i] <= '9')
		i++;
	if (i == 0 || i == 20 || i + 10 > len || p[i] != ' ' || p[i + 9] != ' ')
		return 0;
	memcpy(num, p, i);
	num[i] = 0;
	uint64_t s = strtoull(num, NULL, 10);
	uint32_t want = 0;
	for (size_t k = i + 1; k < i + 9; k++) {
		char c = p[k];
		uint32_t d;
		if (c >= '0' && c <= '9')
			d = (uint32_t)(c - '0');
		else if (c >= 'a' && c <= 'f')
			d = (uint32_t)(c - 'a' + 10);
		else
			return 0;
		want = want << 4 | d;
	}
	const char *pl = p + i + 10;
	size_t pl_len = len - i - 10;
	uint32_t crc = crc32_update(0, p, i);
	crc = crc32_update(crc, " ", 1);
	crc = crc32_update(crc, pl, pl_len);
	if (crc != want)
		return 0;
	*seq = s;
	*payload = pl;
	*payload_len = pl_len;
	return 1;
}

static char *read_file(int fd, off_t *size_out)
{
	struct stat st;
	if (fstat(fd, &st) < 0)
		die("stat records.log: %s", strerror(errno));
	char *data = xrealloc(NULL, (size_t)st.st_size + 1);
	off_t got = 0;
	while (got < st.st_size) {
		ssize_t n = pread(fd, data + got, (size_t)(st.st_size - got), got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die("read records.log: %s", n < 0 ? strerror(errno) : "short read");
		got += n;
	}
	*size_out = st.st_size;
	return data;
}

/*
 * Open and recover DIR/records.log: keep the longest prefix of valid records
 * with consecutive seqs; a tail after it that holds no valid record at all is
 * a torn append and is cut off (and the cut made durable).  A valid record
 * after an invalid one means corruption in the middle: refuse to start rather
 * than silently drop acknowledged records.
 */
static void store_open(struct store *st)
{
	require_dir(st->dir);
	st->path = join_path(st->dir, "records.log");
	int existed = access(st->path, F_OK) == 0;
	st->fd = open(st->path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (st->fd < 0)
		die("open %s: %s", st->path, strerror(errno));
	if (!existed)
		fsync_dir(st->dir);
	off_t size;
	char *data = read_file(st->fd, &size);
	off_t pos = 0;
	uint64_t count = 0;
	while (pos < size) {
		char *nl = memchr(data + pos, '\n', (size_t)(size - pos));
		uint64_t seq;
		const char *pl;
		size_t pl_len;
		if (!nl || !parse_record(data + pos, (size_t)(nl - (data + pos)), &seq, &pl, &pl_len) ||
		    seq != count + 1)
			break;
		count = seq;
		pos = nl + 1 - data;
	}
	if (pos < size) {
		/* Is there any valid record in the tail?  Then this is not a torn append. */
		for (off_t q = pos; q < size;) {
			char *nl = memchr(data + q, '\n', (size_t)(size - q));
			if (!nl)
				break;
			uint64_t seq;
			const char *pl;
			size_t pl_len;
			if (q > pos && parse_record(data + q, (size_t)(nl - (data + q)), &seq, &pl, &pl_len))
				die("%s is corrupt at byte %lld: a valid record (seq %" PRIu64
				    ") follows an invalid one; refusing to drop it",
				    st->path, (long long)pos, seq);
			q = nl + 1 - data;
		}
		printf("kguest records: dropping a torn trailing record (%lld bytes at offset %lld)\n",
		       (long long)(size - pos), (long long)pos);
		fflush(stdout);
		if (ftruncate(st->fd, pos) < 0 || fsync(st->fd) < 0)
			die("truncate %s: %s", st->path, strerror(errno));
	}
	free(data);
	st->count = count;
	st->size = pos;
	st->dirty = 0;
	printf("kguest records: %s holds %" PRIu64 " records\n", st->path, count);
	fflush(stdout);
}

static int write_all_at(int fd, const char *p, size_t n, off_t off)
{
	while (n) {
		ssize_t w = pwrite(fd, p, n, off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		p += w;
		n -= (size_t)w;
		off += w;
	}
	return 0;
}

/* Append one record; returns its seq, or 0 (errno set) with the file unchanged. */
static uint64_t store_append(struct store *st, const char *payload, size_t len)
{
	uint64_t seq = st->count + 1;
	char head[32];
	int hn = snprintf(head, sizeof(head), "%" PRIu64, seq);
	uint32_t crc = crc32_update(0, head, (size_t)hn);
	crc = crc32_update(crc, " ", 1);
	crc = crc32_update(crc, payload, len);
	struct buf line = {0};
	buf_printf(&line, "%s %08x ", head, crc);
	buf_append(&line, payload, len);
	buf_append(&line, "\n", 1);
	int rc = write_all_at(st->fd, line.data, line.len, st->size);
	int saved = errno;
	if (rc < 0) {
		/* Undo a partial append so the file still ends on a record boundary. */
		if (ftruncate(st->fd, st->size) < 0)
			die("write %s failed and cannot be undone: %s", st->path, strerror(errno));
		free(line.data);
		errno = saved;
		return 0;
	}
	st->size += (off_t)line.len;
	st->count = seq;
	st->dirty = 1;
	free(line.data);
	return seq;
}

static void store_sync(struct store *st)
{
	if (st->dirty && fsync(st->fd) < 0)
		/* Unknown what reached the disk: stop, the next start recovers. */
		die("fsync %s: %s", st->path, strerror(errno));
	st->dirty = 0;
}

static void store_dump(struct store *st, struct buf *out)
{
	off_t size;
	char *data = read_file(st->fd, &size);
	if (size > st->size)
		size = st->size;
	off_t pos = 0;
	uint64_t n = 0;
	while (pos < size) {
		char *nl = memchr(data + pos, '\n', (size_t)(size - pos));
		uint64_t seq;
		const char *pl;
		size_t pl_len;
		if (!nl || !parse_record(data + pos, (size_t)(nl - (data + pos)), &seq, &pl, &pl_len))
			die("%s changed under the service at byte %lld", st->path, (long long)pos);
		buf_printf(out, "REC %" PRIu64 " ", seq);
		buf_append(out, pl, pl_len);
		buf_append(out, "\n", 1);
		n++;
		pos = nl + 1 - data;
	}
	free(data);
	buf_printf(out, "END %" PRIu64 "\n", n);
}

static int valid_payload(const char *p, size_t len)
{
	if (len == 0 || len > MAX_PAYLOAD)
		return 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)p[i];
		if (c < 0x20 || c == 0x7f)
			return 0;
	}
	return 1;
}

/*
 * The frames this guest's network interfaces have sent, summed over every
 * interface but loopback (sysfs statistics/tx_packets: what the driver saw
 * completed).  Returns 0, or -1 with errno set.
 */
static int net_tx_packets(uint64_t *total)
{
	DIR *dir = opendir("/sys/class/net");
	if (!dir)
		return -1;
	*total = 0;
	int rc = 0;
	struct dirent *ent;
	while ((ent = readdir(dir))) {
		if (ent->d_name[0] == '.' || !strcmp(ent->d_name, "lo"))
			continue;
		char path[320];
		snprintf(path, sizeof(path), "/sys/class/net/%s/statistics/tx_packets", ent->d_name);
		FILE *f = fopen(path, "r");
		uint64_t n;
		if (!f) {
			rc = -1;
			break;
		}
		int ok = fscanf(f, "%" SCNu64, &n) == 1;
		fclose(f);
		if (!ok) {
			errno = EINVAL;
			rc = -1;
			break;
		}
		*total += n;
	}
	int saved = errno;
	closedir(dir);
	errno = saved;
	return rc;
}

/* Handle one request line; returns 0, or EXIT_REBOOT / EXIT_POWEROFF. */
static int handle_line(struct store *st, struct client *c, char *line, size_t len)
{
	if (len && line[len - 1] == '\r')
		len--;
	if (len >= 4 && !memcmp(line, "PUT ", 4)) {
		if (!valid_payload(line + 4, len - 4)) {
			buf_printf(&c->out, "ERR payload must be 1..%d bytes without control characters\n",
				   MAX_PAYLOAD);
			return 0;
		}
		uint64_t seq = store_append(st, line + 4, len - 4);
		if (seq)
			buf_printf(&c->out, "OK %" PRIu64 "\n", seq);
		else
			buf_printf(&c->out, "ERR write failed: %s\n", strerror(errno));
	} else if (len == 3 && !memcmp(line, "GET", 3)) {
		store_dump(st, &c->out);
	} else if (len == 5 && !memcmp(line, "COUNT", 5)) {
		buf_printf(&c->out, "COUNT %" PRIu64 "\n", st->count);
	} else if (len == 4 && !memcmp(line, "PING", 4)) {
		buf_printf(&c->out, "PONG\n");
	} else if (len == 7 && !memcmp(line, "NETSTAT", 7)) {
		uint64_t tx;
		if (net_tx_packets(&tx) == 0)
			buf_printf(&c->out, "NETSTAT tx_packets=%" PRIu64 "\n", tx);
		else
			buf_printf(&c->out, "ERR netstat: %s\n", strerror(errno));
	} else if (len == 6 && !memcmp(line, "REBOOT", 6)) {
		buf_printf(&c->out, "OK reboot\n");
		return EXIT_REBOOT;
	} else if (len == 8 && !memcmp(line, "POWEROFF", 8)) {
		buf_printf(&c->out, "OK poweroff\n");
		return EXIT_POWEROFF;
	} else {
		buf_printf(&c->out, "ERR unknown command (PUT <payload>, GET, COUNT, PING, NETSTAT, "
				    "REBOOT, POWEROFF)\n");
	}
	return 0;
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		die("fcntl: %s", strerror(errno));
}

static void client_close(struct client *c)
{
	close(c->fd);
	free(c->in.data);
	free(c->out.data);
	memset(c, 0, sizeof(*c));
	c->fd = -1;
}

/* Write as much of c->out as the socket takes; returns -1 if the peer is gone. */
static int client_flush(struct client *c)
{
	while (c->out.len) {
		ssize_t n = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		if (n <= 0)
			return -1;
		buf_consume(&c->out, (size_t)n);
	}
	return 0;
}

/* Blocking best-effort flush of every reply before the process exits. */
static void flush_all_blocking(struct client *clients, int n)
{
	for (int i = 0; i < n; i++) {
		if (clients[i].fd < 0)
			continue;
		int fl = fcntl(clients[i].fd, F_GETFL);
		if (fl >= 0)
			fcntl(clients[i].fd, F_SETFL, fl & ~O_NONBLOCK);
		client_flush(&clients[i]);
		shutdown(clients[i].fd, SHUT_RDWR);
	}
}

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static int cmd_records(int argc, char **argv)
{
	const char *listen_addr = "0.0.0.0";
	long port = 7000;
	struct store st = {.dir = "/data", .fd = -1};
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--dir") && i + 1 < argc)
			st.dir = argv[++i];
		else if (!strcmp(argv[i], "--listen") && i + 1 < argc)
			listen_addr = argv[++i];
		else if (!strcmp(argv[i], "--port") && i + 1 < argc)
			port = parse_long("port", argv[++i], 0, 65535);
		else
			die("records: unknown argument '%s'", argv[i]);
	}
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sa = {.sa_handler = on_stop};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	/* One descriptor per client: lift the soft limit as far as allowed. */
	struct rlimit lim;
	if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
		lim.rlim_cur = lim.rlim_max;
		setrlimit(RLIMIT_NOFILE, &lim);
	}
	store_open(&st);

	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (inet_pton(AF_INET, listen_addr, &addr.sin_addr) != 1)
		die("invalid listen address '%s'", listen_addr);
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("socket: %s", strerror(errno));
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 128) < 0)
		die("listen on %s:%ld: %s", listen_addr, port, strerror(errno));
	socklen_t alen = sizeof(addr);
	getsockname(lfd, (struct sockaddr *)&addr, &alen);
	set_nonblock(lfd);
	char detail[64];
	snprintf(detail, sizeof(detail), "port=%u", ntohs(addr.sin_port));
	ready("records", detail);

	static struct client clients[MAX_CLIENTS];
	static struct pollfd pfds[MAX_CLIENTS + 1];
	static short revents[MAX_CLIENTS];
	for (int i = 0; i < MAX_CLIENTS; i++)
		clients[i].fd = -1;
	int exit_code = 0;

	while (!stop_requested && !exit_code) {
		/* Only open clients go into the poll set (poll's nfds counts against RLIMIT_NOFILE). */
		nfds_t nfds = 1;
		pfds[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
		for (int i = 0; i < MAX_CLIENTS; i++) {
			struct client *c = &clients[i];
			revents[i] = 0;
			if (c->fd >= 0)
				pfds[nfds++] = (struct pollfd){
					.fd = c->fd,
					.events = (short)((c->closing || c->out.len >= MAX_PENDING_OUT ? 0 : POLLIN) |
							  (c->out.len ? POLLOUT : 0)),
				};
		}
		if (poll(pfds, nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll: %s", strerror(errno));
		}
		for (int i = 0, k = 1; i < MAX_CLIENTS; i++)
			if (clients[i].fd >= 0)
				revents[i] = pfds[k++].revents;
		if (pfds[0].revents & POLLIN) {
			for (;;) {
				int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (fd < 0) {
					if (errno == EMFILE || errno == ENFILE)
						/* Out of descriptors: back off instead of spinning on POLLIN. */
						usleep(10000);
					break;
				}
				int slot = -1;
				for (int i = 0; i < MAX_CLIENTS && slot < 0; i++)
					if (clients[i].fd < 0)
						slot = i;
				if (slot < 0) {
					static const char busy[] = "ERR too many clients\n";
					ssize_t ignored = send(fd, busy, sizeof(busy) - 1, MSG_NOSIGNAL);
					(void)ignored;
					close(fd);
					continue;
				}
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				clients[slot].fd = fd;
			}
		}
		/* Phase 1: read and execute every complete request line. */
		for (int i = 0; i < MAX_CLIENTS && !exit_code; i++) {
			struct client *c = &clients[i];
			/* Backpressure: no new requests while replies pile up unread. */
			if (c->fd < 0 || !(revents[i] & (POLLIN | POLLHUP | POLLERR)) ||
			    c->closing || c->out.len >= MAX_PENDING_OUT)
				continue;
			char tmp[16384];
			ssize_t n = recv(c->fd, tmp, sizeof(tmp), 0);
			if (n < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (n <= 0) {
				/* Peer closed or failed: its unanswered requests die with it. */
				c->closing = 1;
				c->in.len = 0;
			} else {
				buf_append(&c->in, tmp, (size_t)n);
			}
			char *nl;
			while (!exit_code && c->in.len &&
			       (nl = memchr(c->in.data, '\n', c->in.len)) != NULL) {
				size_t len = (size_t)(nl - c->in.data);
				exit_code = handle_line(&st, c, c->in.data, len);
				buf_consume(&c->in, len + 1);
			}
			if (c->in.len > MAX_LINE) {
				buf_printf(&c->out, "ERR line too long\n");
				c->in.len = 0;
				c->closing = 1;
			}
		}
		/*
		 * Phase 2: one fsync covers every append of this round (group
		 * commit).  Only after it returns may any reply leave: an OK, a GET
		 * listing or a COUNT must never reveal a record that is not durable.
		 */
		store_sync(&st);
		/* Phase 3: send replies; drop clients that are gone or done. */
		for (int i = 0; i < MAX_CLIENTS; i++) {
			struct client *c = &clients[i];
			if (c->fd < 0)
				continue;
			if (client_flush(c) < 0 || (c->closing && !c->out.len))
				client_close(c);
		}
	}
	store_sync(&st);
	flush_all_blocking(clients, MAX_CLIENTS);
	close(st.fd);
	close(lfd);
	printf("kguest records: stopping (%s)\n",
	       exit_code == EXIT_REBOOT     ? "reboot requested"
	       : exit_code == EXIT_POWEROFF ? "poweroff requested"
					    : "signal");
	fflush(stdout);
	return exit_code;
}

/* ---------------------------------------------------------------- diskload */

/*
 * DIR/diskload.bin is N blocks of 4096 bytes.  Write number s (s = 0, 1, ...)
 * goes to block s % N and holds: magic, layout (N, K), block index, s, a
 * filler derived from (s, index), and a CRC-32 of everything before it in the
 * last 4 bytes.  fsync after every K writes.  Unwritten blocks are all zero.
 */

#define DL_BLOCK 4096
#define DL_MAGIC 0x4b444c42u /* "KDLB" */

struct dl_header {
	uint32_t magic;
	uint32_t blocks;
	uint32_t sync_every;
	uint32_t index;
	uint64_t seq;
};

static void dl_fill(unsigned char *blk, uint32_t blocks, uint32_t sync_every, uint32_t index,
		    uint64_t seq)
{
	struct dl_header h = {DL_MAGIC, blocks, sync_every, index, seq};
	memset(blk, 0, DL_BLOCK);
	memcpy(blk, &h, sizeof(h));
	uint64_t x = seq * 0x9E3779B97F4A7C15ull ^ ((uint64_t)index << 32 | 0x5bd1e995u);
	for (size_t off = sizeof(h); off + 8 <= DL_BLOCK - 4; off += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(blk + off, &x, 8);
	}
	uint32_t crc = crc32_update(0, blk, DL_BLOCK - 4);
	memcpy(blk + DL_BLOCK - 4, &crc, 4);
}

enum dl_kind { DL_ZERO, DL_VALID, DL_BAD };

static enum dl_kind dl_check(const unsigned char *blk, uint32_t index, struct dl_header *h)
{
	static const unsigned char zero[DL_BLOCK];
	if (!memcmp(blk, zero, DL_BLOCK))
		return DL_ZERO;
	memcpy(h, blk, sizeof(*h));
	uint32_t crc;
	memcpy(&crc, blk + DL_BLOCK - 4, 4);
	if (h->magic != DL_MAGIC || h->index != index || crc != crc32_update(0, blk, DL_BLOCK - 4) ||
	    h->blocks == 0 || h->sync_every == 0 || h->seq % h->blocks != index)
		return DL_BAD;
	unsigned char expect[DL_BLOCK];
	dl_fill(expect, h->blocks, h->sync_every, index, h->seq);
	return memcmp(expect, blk, DL_BLOCK) ? DL_BAD : DL_VALID;
}

struct dl_result {
	int ok;
	uint32_t blocks, written, sync_every;
	uint64_t max_seq;
	char why[160];
};

/*
 * Verify the file.  Coherence: with the last completed fsync covering writes
 * up to P, no write beyond P + K was issued, so max_seq <= P + K; every block
 * then holds at least its newest seq <= P, which is > P - N >= max_seq - K - N.
 * A block below max_seq - K that is still unwritten likewise means lost writes.
 */
static struct dl_result dl_verify(int fd)
{
	struct dl_result r = {.ok = 1};
	struct stat st;
	if (fstat(fd, &st) < 0 || st.st_size % DL_BLOCK) {
		snprintf(r.why, sizeof(r.why), "file size is not a multiple of %d", DL_BLOCK);
		r.ok = 0;
		return r;
	}
	uint32_t n = (uint32_t)(st.st_size / DL_BLOCK);
	unsigned char blk[DL_BLOCK];
	uint64_t *seqs = xrealloc(NULL, (n ? n : 1) * sizeof(uint64_t));
	unsigned char *kinds = xrealloc(NULL, n ? n : 1);
	for (uint32_t i = 0; i < n && r.ok; i++) {
		if (pread(fd, blk, DL_BLOCK, (off_t)i * DL_BLOCK) != DL_BLOCK) {
			snprintf(r.why, sizeof(r.why), "short read at block %u", i);
			r.ok = 0;
			break;
		}
		struct dl_header h;
		kinds[i] = (unsigned char)dl_check(blk, i, &h);
		if (kinds[i] == DL_BAD) {
			snprintf(r.why, sizeof(r.why), "block %u is torn or corrupt", i);
			r.ok = 0;
		} else if (kinds[i] == DL_VALID) {
			if (h.blocks != n || (r.written && h.sync_every != r.sync_every)) {
				snprintf(r.why, sizeof(r.why), "block %u has a different layout", i);
				r.ok = 0;
			}
			r.sync_every = h.sync_every;
			seqs[i] = h.seq;
			if (!r.written || h.seq > r.max_seq)
				r.max_seq = h.seq;
			r.written++;
		}
	}
	r.blocks = n;
	for (uint32_t i = 0; i < n && r.ok && r.written; i++) {
		uint64_t window = (uint64_t)n + r.sync_every;
		if (kinds[i] == DL_VALID && seqs[i] + window < r.max_seq + 1) {
			snprintf(r.why, sizeof(r.why), "block %u holds stale seq %" PRIu64 " (max %" PRIu64 ")",
				 i, seqs[i], r.max_seq);
			r.ok = 0;
		} else if (kinds[i] == DL_ZERO && (uint64_t)i + r.sync_every < r.max_seq + 1) {
			snprintf(r.why, sizeof(r.why), "block %u is unwritten below seq %" PRIu64, i,
				 r.max_seq);
			r.ok = 0;
		}
	}
	free(seqs);
	free(kinds);
	return r;
}

static void dl_print(const struct dl_result *r)
{
	if (r->ok)
		printf("diskload-verify: OK blocks=%u written=%u max_seq=%" PRIu64 "\n", r->blocks,
		       r->written, r->written ? r->max_seq : 0);
	else
		printf("diskload-verify: FAIL %s\n", r->why);
	fflush(stdout);
}

static int cmd_diskload(int argc, char **argv)
{
	const char *dir = "/data";
	long blocks = 1024, sync_every = 16, count = -1;
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--dir") && i + 1 < argc)
			dir = argv[++i];
		else if (!strcmp(argv[i], "--blocks") && i + 1 < argc)
			blocks = parse_long("block count", argv[++i], 1, 1 << 24);
		else if (!strcmp(argv[i], "--sync-every") && i + 1 < argc)
			sync_every = parse_long("sync interval", argv[++i], 1, 1 << 20);
		else if (!strcmp(argv[i], "--count") && i + 1 < argc)
			count = parse_long("write count", argv[++i], 0, INT64_MAX);
		else
			die("diskload: unknown argument '%s'", argv[i]);
	}
	require_dir(dir);
	char *path = join_path(dir, "diskload.bin");
	int existed = access(path, F_OK) == 0;
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open %s: %s", path, strerror(errno));
	uint64_t seq = 0;
	if (existed) {
		/* Continue an earlier run, but only on top of a coherent file. */
		struct dl_result r = dl_verify(fd);
		dl_print(&r);
		if (!r.ok)
			die("refusing to continue on an inconsistent %s", path);
		if (r.written && r.blocks != (uint32_t)blocks)
			die("%s has %u blocks, not %ld", path, r.blocks, blocks);
		if (r.written && r.sync_every != (uint32_t)sync_every)
			die("%s was written with --sync-every %u", path, r.sync_every);
		seq = r.written ? r.max_seq + 1 : 0;
	}
	if (ftruncate(fd, (off_t)blocks * DL_BLOCK) < 0 || fsync(fd) < 0)
		die("size %s: %s", path, strerror(errno));
	if (!existed)
		fsync_dir(dir);
	char detail[96];
	snprintf(detail, sizeof(detail), "blocks=%ld sync_every=%ld start_seq=%" PRIu64, blocks,
		 sync_every, seq);
	ready("diskload", detail);
	unsigned char blk[DL_BLOCK];
	for (long done = 0; count < 0 || done < count; done++, seq++) {
		uint32_t index = (uint32_t)(seq % (uint64_t)blocks);
		dl_fill(blk, (uint32_t)blocks, (uint32_t)sync_every, index, seq);
		if (write_all_at(fd, (const char *)blk, DL_BLOCK, (off_t)index * DL_BLOCK) < 0)
			die("write %s: %s", path, strerror(errno));
		if ((seq + 1) % (uint64_t)sync_every == 0) {
			if (fsync(fd) < 0)
				die("fsync %s: %s", path, strerror(errno));
			if ((seq + 1) % 1024 == 0) {
				printf("diskload: seq %" PRIu64 " synced\n", seq);
				fflush(stdout);
			}
		}
	}
	if (fsync(fd) < 0)
		die("fsync %s: %s", path, strerror(errno));
	printf("diskload: done, last seq %" PRIu64 "\n", seq ? seq - 1 : 0);
	fflush(stdout);
	close(fd);
	return 0;
}

static int cmd_diskload_verify(int argc, char **argv)
{
	const char *dir = "/data";
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--dir") && i + 1 < argc)
			dir = argv[++i];
		else
			die("diskload-verify: unknown argument '%s'", argv[i]);
	}
	require_dir(dir);
	char *path = join_path(dir, "diskload.bin");
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open %s: %s", path, strerror(errno));
	struct dl_result r = dl_verify(fd);
	dl_print(&r);
	close(fd);
	return r.ok ? 0 : 1;
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv)
{
	crc32_init();
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) {
		fprintf(stderr, "usage: kguest ticks|records|diskload|diskload-verify [options]\n");
		return 2;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "ticks"))
		return cmd_ticks(argc - 2, argv + 2);
	if (!strcmp(cmd, "records"))
		return cmd_records(argc - 2, argv + 2);
	if (!strcmp(cmd, "diskload"))
		return cmd_diskload(argc - 2, argv + 2);
	if (!strcmp(cmd, "diskload-verify"))
		return cmd_diskload_verify(argc - 2, argv + 2);
	fprintf(stderr, "kguest: unknown workload '%s'\n", cmd);
	return 2;
}
