"""A TCP proxy a test runs in front of Redis, which can stop forwarding one role's traffic without closing.

That is what a firewall or NAT that forgot a flow does: no reset, no FIN, just silence. The proxy tells a
connection's role by the ``CLIENT SETNAME observer_tasks:<role>`` redis-py sends when it connects.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from .conftest import free_port


class Proxy(threading.Thread):
    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(name="test-proxy", daemon=True)
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = int(self.listener.getsockname()[1])
        self.silenced: set[str] = set()  # roles whose traffic is dropped (connections kept open)
        self.opened: dict[str, int] = {}  # connections seen per role
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                client, _addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self.pipe, args=(client,), daemon=True).start()

    def pipe(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        with self.lock:
            self.sockets += [client, server]
        role, head = "", b""
        while not self.stopped.is_set():
            if role in self.silenced:
                self.stopped.wait(0.05)  # read nothing, send nothing, close nothing
                continue
            readable, _, _ = select.select([client, server], [], [], 0.1)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    client.close()
                    server.close()
                    return
                if sock is client and not role and len(head) < 4096:
                    head += data
                    marker = head.find(b"observer_tasks:")
                    end = head.find(b"\r\n", marker) if marker >= 0 else -1
                    if end > 0:
                        role = head[marker + len(b"observer_tasks:"):end].decode(errors="replace")
                        with self.lock:
                            self.opened[role] = self.opened.get(role, 0) + 1
                        if role in self.silenced:
                            break  # a new connection of a silenced role is silent from its first byte
                (server if sock is client else client).sendall(data)

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.close()
