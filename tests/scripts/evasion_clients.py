"""Legitimate clients (ordinary sockets) for keywall's evasion tests (client namespace).

Usage: evasion_clients.py COMMAND ARG...   Each prints one JSON object.

  http SRC DST PORT KEY MODE
      MODE keepalive: three requests one after the other on one connection;
      pipelined: three requests in one write; pipelined-segments: three requests in three
      writes (TCP_NODELAY) before reading any answer. -> {"statuses": [...]}
  lost-ack SRC DST PORT KEY
      Connects, prints `CONNECTED <local port>`, waits for a line on stdin (the test drops
      the server's packets to this port meanwhile), sends one request and reads the answer
      (10 s at most). -> {"status", "retrans": tcpi_total_retrans}
  fix-session SRC DST PORT KEY
      A simplefix Logon with KEY in 553, then three TestRequests, one segment each.
      -> {"logon": bool, "heartbeats": n}
  hold KIND SRC DST PORT KEY_OR_SNI GO_FILE [CAFILE]
      KIND http|tls|fix: one exchange now (an HTTP request with the key, a TLS handshake
      naming the SNI and a request, a FIX Logon), then waits until GO_FILE exists and tries a
      second one on the same connection (2 s). -> {"first": ..., "second": ...}
"""

import json
import os
import socket
import ssl
import struct
import sys
import time


def connect(src, dst, port, timeout=3.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect((dst, int(port)))
    return s


def request(key, tag=b""):
    return (b"GET /api/v3/account%s HTTP/1.1\r\nHost: api.test\r\nX-MBX-APIKEY: %s\r\n\r\n"
            % (tag, key.encode()))


class Responses:
    """Reads HTTP/1.1 responses with a Content-Length from a socket."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def next(self):
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.buf += data
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            rest += data
        self.buf = rest[length:]
        return int(head.split(b" ")[1])


def outcome(fn):
    try:
        return fn()
    except (socket.timeout, TimeoutError):
        return "TIMEOUT"
    except (OSError, EOFError, ssl.SSLError) as e:
        return "ERROR %s" % e


def cmd_http(src, dst, port, key, mode):
    s = connect(src, dst, port)
    r = Responses(s)
    statuses = []

    def run():
        if mode == "keepalive":
            for i in range(3):
                s.sendall(request(key, b"?n=%d" % i))
                statuses.append(r.next())
        elif mode == "pipelined":
            s.sendall(b"".join(request(key, b"?n=%d" % i) for i in range(3)))
            for _ in range(3):
                statuses.append(r.next())
        else:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(3):
                s.sendall(request(key, b"?n=%d" % i))
            for _ in range(3):
                statuses.append(r.next())
        return "done"

    res = outcome(run)
    return {"statuses": statuses, "result": res}


def total_retrans(sock):
    # struct tcp_info: tcpi_total_retrans is the u32 at offset 100 (native byte order).
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack("=I", info[100:104])[0]


def cmd_lost_ack(src, dst, port, key):
    s = connect(src, dst, port, timeout=10.0)
    print("CONNECTED %d" % s.getsockname()[1], flush=True)
    sys.stdin.readline()
    r = Responses(s)
    s.sendall(request(key))
    status = outcome(r.next)
    return {"status": status, "retrans": total_retrans(s)}


def fix_message(pairs):
    import simplefix

    m = simplefix.FixMessage()
    for tag, value, header in pairs:
        m.append_pair(tag, value, header=header)
    return m.encode()


def fix_logon(key):
    return fix_message([(8, "FIX.4.4", True), (35, "A", True), (49, "KWCLIENT", True),
                        (56, "KEYWALL-EDGE", True), (34, 1, True),
                        (52, "20260101-00:00:00.000", True), (98, 0, False),
                        (108, 30, False), (553, key, False), (554, "secret", False)])


def fix_test_request(seq):
    return fix_message([(8, "FIX.4.4", True), (35, "1", True), (49, "KWCLIENT", True),
                        (56, "KEYWALL-EDGE", True), (34, seq, True),
                        (52, "20260101-00:00:00.000", True), (112, "ping%d" % seq, False)])


def fix_reply(sock, parser):
    while True:
        msg = parser.get_message()
        if msg is not None:
            return msg
        data = sock.recv(4096)
        if not data:
            raise EOFError("connection closed")
        parser.append_buffer(data)


def cmd_fix_session(src, dst, port, key):
    import simplefix

    s = connect(src, dst, port)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    p = simplefix.FixParser()
    out = {"logon": False, "heartbeats": 0}

    def run():
        s.sendall(fix_logon(key))
        out["logon"] = fix_reply(s, p).get(35) == b"A"
        for seq in range(2, 5):
            s.sendall(fix_test_request(seq))
            if fix_reply(s, p).get(35) == b"0":
                out["heartbeats"] += 1
        return "done"

    out["result"] = outcome(run)
    return out


def wait_for(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit("go file never appeared")
        time.sleep(0.05)


def cmd_hold(kind, src, dst, port, key, go, cafile=None):
    s = connect(src, dst, port, timeout=2.0)
    if kind == "http":
        r = Responses(s)
        first = outcome(lambda: (s.sendall(request(key)), r.next())[1])
        wait_for(go)
        second = outcome(lambda: (s.sendall(request(key)), r.next())[1])
    elif kind == "tls":
        ctx = ssl.create_default_context(cafile=cafile)
        t = ctx.wrap_socket(s, server_hostname=key)
        r = Responses(t)
        first = outcome(lambda: (t.sendall(request("none")), r.next())[1])
        wait_for(go)
        second = outcome(lambda: (t.sendall(request("none")), r.next())[1])
    else:
        import simplefix

        p = simplefix.FixParser()
        first = outcome(lambda: (s.sendall(fix_logon(key)), fix_reply(s, p).get(35).decode())[1])
        wait_for(go)
        second = outcome(lambda: (s.sendall(fix_test_request(2)),
                                  fix_reply(s, p).get(35).decode())[1])
    return {"first": first, "second": second}


COMMANDS = {
    "http": cmd_http,
    "lost-ack": cmd_lost_ack,
    "fix-session": cmd_fix_session,
    "hold": cmd_hold,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    print(json.dumps(COMMANDS[sys.argv[1]](*sys.argv[2:])), flush=True)


if __name__ == "__main__":
    main()
