"""A TCP proxy on a fixed port, in front of RabbitMQ, that the soak stops and starts: the broker fault.

The shared RabbitMQ node serves other engineers, so the soak never stops it. Instead the workers' and the
apply process's broker connections go through this proxy (``amqp://...@127.0.0.1:<proxy port>/h1``), and
"broker stopped" is the proxy stopped: every connection through it is reset (RST, SO_LINGER 0) and new ones
are refused (nothing listens on the port); "started" listens again on the same port. To the observer that is
a broker that went away and came back; RabbitMQ itself keeps the queue and its messages, as a restarted node
with durable queues would. (tests/proxy.py silences Redis connections by role and takes any free port; this
one needs a fixed port and resets.)
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading


class TcpProxy:
    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self.listener: socket.socket | None = None
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.accepted = 0

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self.listener = listener
        self.running.set()
        threading.Thread(target=self._accept, args=(listener,), name="chaos-proxy", daemon=True).start()

    def stop(self) -> int:
        """Refuse new connections and reset every open one; returns how many were reset."""
        self.running.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)
        return len(pairs)

    def _accept(self, listener: socket.socket) -> None:
        while self.running.is_set():
            try:
                client, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            try:
                server = socket.create_connection(self.target, timeout=2)
            except OSError:
                _reset(client)
                continue
            with self.lock:
                if not self.running.is_set():
                    _reset(client)
                    _reset(server)
                    return
                self.pairs.append((client, server))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # closed by a peer, or reset by stop() (ValueError: fd -1 in select)
            pass
        finally:
            with self.lock:
                if (client, server) in self.pairs:
                    self.pairs.remove((client, server))
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST, not a FIN: what a peer sees when the broker's host drops the connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
