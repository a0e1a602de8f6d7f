"""A FIX acceptor for keywall's end-to-end tests and demo (runs in the edge namespace).

Usage: fix_acceptor.py PORT READY_FILE

Listens dual-stack on [::]:PORT. Every Logon (35=A) is answered with a Logon carrying the same
BeginString and the CompIDs swapped; a TestRequest (35=1) gets a Heartbeat (35=0). Anything
else is read and ignored. Built on simplefix (PyPI).
"""

import socket
import socketserver
import sys

import simplefix


def reply_to(msg, msg_type, seq):
    out = simplefix.FixMessage()
    out.append_pair(8, msg.get(8).decode(), header=True)
    out.append_pair(35, msg_type, header=True)
    out.append_pair(49, (msg.get(56) or b"KEYWALL-EDGE").decode(), header=True)
    out.append_pair(56, (msg.get(49) or b"CLIENT").decode(), header=True)
    out.append_pair(34, seq, header=True)
    out.append_utc_timestamp(52, header=True)
    return out


class Session(socketserver.BaseRequestHandler):
    def handle(self):
        parser = simplefix.FixParser()
        seq = 1
        while True:
            try:
                data = self.request.recv(65536)
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
                    out = reply_to(msg, "A", seq)
                    out.append_pair(98, 0)
                    out.append_pair(108, (msg.get(108) or b"30").decode())
                elif kind == b"1":
                    out = reply_to(msg, "0", seq)
                    out.append_pair(112, (msg.get(112) or b"").decode())
                else:
                    continue
                seq += 1
                self.request.sendall(out.encode())


class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main():
    port, ready = int(sys.argv[1]), sys.argv[2]
    srv = Server(("::", port), Session)
    open(ready, "w").close()
    srv.serve_forever()


if __name__ == "__main__":
    main()
