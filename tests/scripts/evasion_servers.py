"""Logging servers for keywall's evasion tests (run in the edge namespace).

Usage:
  evasion_servers.py http PORT READY LOG [proxy]
  evasion_servers.py tls PORT READY LOG CERT KEY [hrr]
  evasion_servers.py fix PORT READY LOG

Each listens dual-stack on [::]:PORT, creates READY once it listens, and appends one line to
LOG for everything it reads that could carry an API key, so a test sees what the server
actually took from the wire (after the kernel reassembled the stream):
  KEY <peer> <value>        http: an X-MBX-APIKEY value (HTTP/1.x or h2c), fix: a Logon's 553
  COMP <peer> <value>       fix: a Logon's 49 (SenderCompID)
  SNI <peer> <name>         tls: the server_name OpenSSL handed to the SNI callback
  VERSION <peer> <version>  tls: the negotiated protocol after a completed handshake
  REQ <peer> <method> <path>
<peer> is the client address (IPv4-mapped addresses unmapped; behind `proxy`, the address the
PROXY v1/v2 header gave).

The HTTP parser is deliberately as lenient as real servers are: line breaks are CRLF, LF or a
bare CR; header names are compared case-insensitively with `_` and `-` the same and blanks
before the colon ignored; obs-fold continuation lines extend the previous header; a connection
that opens with the HTTP/2 preface is read as h2c (prior knowledge) and its HEADERS frames
decoded (HPACK literals; Huffman-coded strings are not decoded). The listener takes data on
SYN (TCP Fast Open) when the namespace's net.ipv4.tcp_fastopen allows it. `hrr`: the TLS
server offers P-256 alone, so a client whose first key share is X25519 (curl's default) gets
a HelloRetryRequest and sends a second ClientHello.
"""

import ipaddress
import re
import socket
import socketserver
import ssl
import struct
import sys
import threading

KEY_HEADER = b"x-mbx-apikey"
BODY = b"keywall-test-ok\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LOG_LOCK = threading.Lock()
LOG_PATH = None


def log(kind, peer, *rest):
    text = " ".join([kind, peer] + [r if isinstance(r, str) else r.decode("latin-1") for r in rest])
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    with LOG_LOCK:
        with open(LOG_PATH, "a") as f:
            f.write(text + "\n")


def unmap(addr):
    a = ipaddress.ip_address(addr.split("%")[0])
    if a.version == 6 and a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return str(a)


def norm_name(name):
    return name.strip(b" \t").lower().replace(b"_", b"-")


# ---------------------------------------------------------------------------------------------
# PROXY v1 / v2


def read_proxy(reader):
    """Consumes a PROXY header; returns the client address it names (None for LOCAL)."""
    head = reader.need(16)
    if head.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
        length = struct.unpack("!H", head[14:16])[0]
        body = reader.need(16 + length)[16:16 + length]
        reader.take(16 + length)
        fam = head[13] >> 4
        if fam == 1:
            return str(ipaddress.IPv4Address(body[:4]))
        if fam == 2:
            return str(ipaddress.IPv6Address(body[:16]))
        return None
    if head.startswith(b"PROXY "):
        line = reader.line_crlf()
        parts = line.split(b" ")
        return parts[2].decode() if len(parts) > 2 and parts[1] != b"UNKNOWN" else None
    raise ValueError("no PROXY header")


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def more(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def need(self, n):
        while len(self.buf) < n:
            self.more()
        return self.buf

    def take(self, n):
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line_crlf(self):
        while b"\r\n" not in self.buf:
            self.more()
        i = self.buf.index(b"\r\n")
        return self.take(i + 2)[:-2]

    def line_lenient(self):
        """A line ended by CRLF, LF or a bare CR (a CR at the buffer's end waits for more)."""
        while True:
            m = re.search(rb"\r\n|\n|\r", self.buf)
            if m and not (m.group() == b"\r" and m.end() == len(self.buf)):
                line = self.buf[:m.start()]
                self.buf = self.buf[m.end():]
                return line
            self.more()


# ---------------------------------------------------------------------------------------------
# HTTP/1.x, lenient


def serve_http1(reader, send, peer):
    while True:
        line = reader.line_lenient()
        if not line.strip():
            continue  # blank lines between requests
        parts = line.split()
        method, path = (parts + [b"", b""])[:2]
        log("REQ", peer, method, path)
        headers = []
        while True:
            h = reader.line_lenient()
            if h == b"":
                break
            if h[:1] in (b" ", b"\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, (value + b" " + h.strip()).strip())
                continue
            name, _, value = h.partition(b":")
            headers.append((norm_name(name), value.strip(b" \t")))
        length = 0
        for name, value in headers:
            if name == KEY_HEADER:
                log("KEY", peer, value)
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = 0
        if length:
            reader.need(length)
            reader.take(length)
        send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
             % (len(BODY), BODY))


# ---------------------------------------------------------------------------------------------
# h2c with prior knowledge: enough HPACK to read literal header fields

STATIC_NAMES = {1: b":authority", 2: b":method", 3: b":method", 4: b":path", 5: b":path",
                6: b":scheme", 7: b":scheme"}


def hpack_int(block, i, prefix_bits):
    limit = (1 << prefix_bits) - 1
    value = block[i] & limit
    i += 1
    if value < limit:
        return value, i
    shift = 0
    while True:
        b = block[i]
        i += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def hpack_str(block, i):
    huffman = block[i] & 0x80
    n, i = hpack_int(block, i, 7)
    s = block[i:i + n]
    return (b"<huffman>" if huffman else s), i + n


def hpack_fields(block):
    i, out = 0, []
    while i < len(block):
        b = block[i]
        if b & 0x80:  # indexed field
            _, i = hpack_int(block, i, 7)
            continue
        if b & 0xE0 == 0x20:  # dynamic table size update
            _, i = hpack_int(block, i, 5)
            continue
        bits = 6 if b & 0x40 else 4
        idx, i = hpack_int(block, i, bits)
        if idx == 0:
            name, i = hpack_str(block, i)
        else:
            name = STATIC_NAMES.get(idx, b"?")
        value, i = hpack_str(block, i)
        out.append((name, value))
    return out


def serve_h2c(reader, send, peer):
    reader.need(len(H2_PREFACE))
    reader.take(len(H2_PREFACE))
    send(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # our SETTINGS
    while True:
        head = reader.need(9)[:9]
        length = int.from_bytes(head[:3], "big")
        ftype, flags = head[3], head[4]
        frame = reader.need(9 + length)[9:9 + length]
        reader.take(9 + length)
        if ftype == 0x4 and not flags & 1:
            send(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # SETTINGS ack
        if ftype in (0x1, 0x9):  # HEADERS, CONTINUATION
            block = frame
            if ftype == 0x1:
                if flags & 0x8:
                    pad = block[0]
                    block = block[1:len(block) - pad]
                if flags & 0x20:
                    block = block[5:]
            try:
                fields = hpack_fields(block)
            except IndexError:
                fields = []
            for name, value in fields:
                if name == b":path":
                    log("REQ", peer, b"H2", value)
                if norm_name(name) == KEY_HEADER:
                    log("KEY", peer, value)


def serve_http(sock, peer, proxied):
    reader = Reader(sock)
    try:
        if proxied:
            named = read_proxy(reader)
            if named is not None:
                peer = unmap(named)
        reader.need(1)
        if H2_PREFACE.startswith(reader.buf[:len(H2_PREFACE)]):
            reader.need(len(H2_PREFACE))
            if reader.buf.startswith(H2_PREFACE):
                return serve_h2c(reader, sock.sendall, peer)
        serve_http1(reader, sock.sendall, peer)
    except (EOFError, OSError, ValueError, IndexError):
        return


# ---------------------------------------------------------------------------------------------
# FIX (simplefix)


def serve_fix(sock, peer):
    import simplefix

    parser = simplefix.FixParser()
    seq = 1
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        parser.append_buffer(data)
        while True:
            msg = parser.get_message()
            if msg is None:
                break
            kind = msg.get(35)
            if kind == b"A":
                log("KEY", peer, msg.get(553) or b"-")
                log("COMP", peer, msg.get(49) or b"-")
                out_type = "A"
            elif kind == b"1":
                out_type = "0"
            else:
                continue
            out = simplefix.FixMessage()
            out.append_pair(8, msg.get(8).decode(), header=True)
            out.append_pair(35, out_type, header=True)
            out.append_pair(49, (msg.get(56) or b"EDGE").decode(), header=True)
            out.append_pair(56, (msg.get(49) or b"CLIENT").decode(), header=True)
            out.append_pair(34, seq, header=True)
            out.append_utc_timestamp(52, header=True)
            if out_type == "A":
                out.append_pair(98, 0)
                out.append_pair(108, 30)
            elif msg.get(112):
                out.append_pair(112, msg.get(112).decode())
            seq += 1
            try:
                sock.sendall(out.encode())
            except OSError:
                return


# ---------------------------------------------------------------------------------------------


class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 64)
        except OSError:
            pass
        super().server_bind()


def main():
    global LOG_PATH
    mode, port, ready, LOG_PATH = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tls = None
    if mode == "tls":
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(sys.argv[5], sys.argv[6])

        def on_sni(sslsock, name, _ctx):
            try:
                peer = unmap(sslsock.getpeername()[0])
            except OSError:
                peer = "?"
            log("SNI", peer, "-" if name is None else name)

        tls.sni_callback = on_sni
        if len(sys.argv) > 7 and sys.argv[7] == "hrr":
            tls.set_ecdh_curve("prime256v1")
    proxied = len(sys.argv) > 5 and sys.argv[5] == "proxy"

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            sock = self.request
            peer = unmap(self.client_address[0])
            sock.settimeout(20)
            if mode == "http":
                serve_http(sock, peer, proxied)
            elif mode == "fix":
                serve_fix(sock, peer)
            else:
                try:
                    t = tls.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError):
                    return
                log("VERSION", peer, t.version() or "-")
                serve_http(t, peer, False)

    srv = Server(("::", port), Handler)
    open(ready, "w").close()
    srv.serve_forever()


if __name__ == "__main__":
    main()
