"""Real clients for keywall's end-to-end tests and demo (run in the client namespace).

Each subcommand prints one line, `OUTCOME detail…`, and exits 0 when it could run at all:
  tls SRC DST PORT SNI TIMEOUT CAFILE
      TLS (the machine's OpenSSL through Python's ssl) with SNI exactly as given (Python keeps
      its case, curl lowercases it), then GET /. -> `HTTP <code>` | `TIMEOUT` | `ERROR <what>`
  split-hello SRC DST PORT SNI SPLIT_AT DELAY_MS TIMEOUT
      A TLS 1.3 ClientHello built here: a 1,216-byte key share (the size of X25519MLKEM768's)
      and padding come before server_name, so the SNI sits past SPLIT_AT. Bytes [0, SPLIT_AT)
      go in one segment (TCP_NODELAY), then DELAY_MS later the rest. SPLIT_AT 0: one write
      (TCP cuts the 1,600-byte hello at the MSS, before the SNI).
      -> `SERVERHELLO` | `TIMEOUT` | `OTHER <hex>` (`ERROR` if SPLIT_AT is not before the SNI)
  fix SRC DST PORT BEGINSTRING KEY_TAG KEY TIMEOUT
      A Logon (35=A) built with simplefix, with KEY in tag KEY_TAG (553 Username or 49
      SenderCompID). -> `LOGON <reply's SenderCompID>` | `TIMEOUT` | `ERROR <what>`
  reset SRC DST PORT HEADER KEY TIMEOUT
      An HTTP request carrying the key; times from the send to the outcome.
      -> `RESET <ms>` (ECONNRESET) | `HTTP <code> <ms>` | `TIMEOUT <ms>` | `EOF <ms>`
  synflood SRC DST PORT SECONDS RATE
      Raw TCP SYNs (random source ports and sequence numbers) at RATE per second.
      -> `SENT <n>`
"""

import errno
import ipaddress
import os
import random
import socket
import ssl
import struct
import sys
import time


def family(addr):
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def connect(src, dst, port, timeout):
    s = socket.socket(family(dst), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect((dst, port))
    return s


# ---------------------------------------------------------------------------------------------
# tls


def cmd_tls(src, dst, port, sni, timeout, cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        s = connect(src, dst, int(port), float(timeout))
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % sni.encode())
        head = b""
        while b"\r\n" not in head:
            chunk = t.recv(4096)
            if not chunk:
                break
            head += chunk
        parts = head.split(b" ", 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/"):
            return "HTTP %s" % parts[1].decode()
        return "ERROR no HTTP status line: %r" % head[:60]
    except (socket.timeout, TimeoutError):
        return "TIMEOUT"
    except (OSError, ssl.SSLError) as e:
        return "ERROR %s" % e


# ---------------------------------------------------------------------------------------------
# split-hello


def ext(kind, body):
    return struct.pack("!HH", kind, len(body)) + body


def u16_list(values):
    body = b"".join(struct.pack("!H", v) for v in values)
    return struct.pack("!H", len(body)) + body


GREASE_EXT = 0x0A0A
GREASE_GROUP = 0x2A2A


def client_hello(sni, padding=256):
    """A TLS 1.3 ClientHello; returns (record bytes, offset of the server_name extension)."""
    name = sni.encode()
    server_name = ext(0x0000, struct.pack("!H", len(name) + 3) + struct.pack("!BH", 0, len(name)) + name)
    # A share the size of X25519MLKEM768's, under a GREASE group that servers skip, so the
    # hello is as big as a post-quantum one whatever this server's OpenSSL supports.
    shares = (
        struct.pack("!HH", GREASE_GROUP, 1216) + os.urandom(1216)
        + struct.pack("!HH", 0x001D, 32) + os.urandom(32)
    )
    before = b"".join([
        ext(GREASE_EXT, b""),
        ext(0x002B, b"\x04\x03\x04\x03\x03"),  # supported_versions: TLS 1.3, 1.2
        ext(0x000A, u16_list([GREASE_GROUP, 0x001D, 0x0017, 0x0018])),  # supported_groups
        ext(0x000D, u16_list([0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601])),
        ext(0x002D, b"\x01\x01"),  # psk_key_exchange_modes: psk_dhe_ke
        ext(0x0033, struct.pack("!H", len(shares)) + shares),  # key_share
        ext(0x0015, bytes(padding)),  # padding
    ])
    exts = before + server_name + ext(0x000B, b"\x01\x00")  # ec_point_formats after it
    body = (
        b"\x03\x03" + os.urandom(32)
        + b"\x20" + os.urandom(32)
        + u16_list([0x1301, 0x1302, 0x1303])
        + b"\x01\x00"
        + struct.pack("!H", len(exts)) + exts
    )
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    record = b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs
    return record, record.index(server_name)


def cmd_split_hello(src, dst, port, sni, split_at, delay_ms, timeout):
    hello, sni_at = client_hello(sni)
    split_at = int(split_at)
    if split_at == 0:
        # One write: TCP cuts it at the MSS (1,448 on a 1,500 MTU), past which the SNI lies.
        if sni_at < 1500:
            return "ERROR the SNI extension at %d would fit in the first segment" % sni_at
        split_at = len(hello)
    elif split_at > sni_at:
        return "ERROR split at %d is not before the SNI extension at %d" % (split_at, sni_at)
    try:
        s = connect(src, dst, int(port), float(timeout))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(hello[:split_at])
        if split_at < len(hello):
            time.sleep(int(delay_ms) / 1000)
            s.sendall(hello[split_at:])
        got = b""
        while len(got) < 6:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, TimeoutError):
        return "TIMEOUT"
    except OSError as e:
        return "ERROR %s" % e
    # A handshake record (22) whose first message is a ServerHello (2).
    if len(got) >= 6 and got[0] == 22 and got[5] == 2:
        return "SERVERHELLO %d-byte hello, SNI extension at %d" % (len(hello), sni_at)
    return "OTHER %s" % got[:16].hex()


# ---------------------------------------------------------------------------------------------
# fix


def cmd_fix(src, dst, port, begin, key_tag, key, timeout):
    import simplefix

    key_tag = int(key_tag)
    logon = simplefix.FixMessage()
    logon.append_pair(8, begin, header=True)
    logon.append_pair(35, "A", header=True)
    logon.append_pair(49, key if key_tag == 49 else "KWCLIENT", header=True)
    logon.append_pair(56, "KEYWALL-EDGE", header=True)
    logon.append_pair(34, 1, header=True)
    logon.append_utc_timestamp(52, header=True)
    logon.append_pair(98, 0)
    logon.append_pair(108, 30)
    if begin == "FIXT.1.1":
        logon.append_pair(1137, 9)  # DefaultApplVerID FIX.5.0SP2
    if key_tag != 49:
        logon.append_pair(key_tag, key)
        logon.append_pair(554, "not-a-real-secret")
    parser = simplefix.FixParser()
    try:
        s = connect(src, dst, int(port), float(timeout))
        s.sendall(logon.encode())
        while True:
            data = s.recv(4096)
            if not data:
                return "ERROR connection closed without a reply"
            parser.append_buffer(data)
            msg = parser.get_message()
            if msg is not None:
                if msg.get(35) == b"A":
                    return "LOGON %s" % msg.get(49).decode()
                return "ERROR reply of type %s" % msg.get(35)
    except (socket.timeout, TimeoutError):
        return "TIMEOUT"
    except OSError as e:
        return "ERROR %s" % e


# ---------------------------------------------------------------------------------------------
# reset


def cmd_reset(src, dst, port, header, key, timeout):
    try:
        s = connect(src, dst, int(port), float(timeout))
    except OSError as e:
        return "ERROR connect: %s" % e
    req = ("GET /api/v3/account HTTP/1.1\r\nHost: edge\r\n%s: %s\r\n\r\n" % (header, key)).encode()
    t0 = time.monotonic()

    def ms():
        return "%.1f" % ((time.monotonic() - t0) * 1000)

    try:
        s.sendall(req)
        data = s.recv(4096)
        if not data:
            return "EOF " + ms()
        return "HTTP %s %s" % (data.split(b" ", 2)[1].decode(), ms())
    except ConnectionResetError:
        return "RESET " + ms()
    except (socket.timeout, TimeoutError):
        return "TIMEOUT " + ms()
    except OSError as e:
        if e.errno == errno.ECONNRESET:
            return "RESET " + ms()
        return "ERROR %s %s" % (e, ms())


# ---------------------------------------------------------------------------------------------
# synflood


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def cmd_synflood(src, dst, port, seconds, rate):
    fam = family(dst)
    s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.bind((src, 0))
    pseudo_addrs = socket.inet_pton(fam, src) + socket.inet_pton(fam, dst)
    port, rate = int(port), int(rate)
    deadline = time.monotonic() + float(seconds)
    sent = 0
    start = time.monotonic()
    while time.monotonic() < deadline:
        sport = random.randint(1024, 65535)
        tcp = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
        if fam == socket.AF_INET6:
            pseudo = pseudo_addrs + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
        else:
            pseudo = pseudo_addrs + struct.pack("!xBH", socket.IPPROTO_TCP, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
        s.sendto(tcp, (dst, 0))
        sent += 1
        # Pace to RATE: a flood, but not one that overflows the veth ring (those drops
        # would never reach the filter to be counted).
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0.001:
            time.sleep(ahead)
    return "SENT %d" % sent


COMMANDS = {
    "tls": cmd_tls,
    "split-hello": cmd_split_hello,
    "fix": cmd_fix,
    "reset": cmd_reset,
    "synflood": cmd_synflood,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    print(COMMANDS[sys.argv[1]](*sys.argv[2:]), flush=True)


if __name__ == "__main__":
    main()
