"""What the checker reads from the live system, written to the run's folder as files.

- ``stream_tail.jsonl``: the observed stream read as it grows, through Sentinel (whichever master Sentinel
  names), one line per entry ``{"id", "port", "fields"}``. The observer trims the stream to ~10 000 entries
  (``MAXLEN ~``) and a soak writes 80 entries a second, so the final stream alone holds the last ~2 minutes;
  the tail keeps the rest.
- ``stream_final.jsonl``: the whole stream as the final master holds it after the drain (``XRANGE``).
- ``inflight.json``: the members of ``quantum:p28:late_obs:inflight`` left after the drain (plan, score).
- ``metrics_start.prom`` / ``metrics_end.prom``: a worker's /metrics page over HTTP before the load and after
  the drain (Prometheus text, as an operator's scrape sees it).
- ``metrics_timeline.jsonl``: every second during the run, the count families of a worker's /metrics page
  (refusals, drops, lost), so the checker knows when each count appeared (accounting.py).

Nothing here interprets what it reads; the checker does.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, cast

import redis
from redis.sentinel import Sentinel

from ..conftest import scrape

STREAM = "quantum:stream:apply.heat.observed"
INFLIGHT = "quantum:p28:late_obs:inflight"


def master_client(sentinels: list[tuple[str, int]], service: str, db: int, timeout: float = 2.0) -> redis.Redis:
    return Sentinel(sentinels, sentinel_kwargs={"socket_timeout": 0.5}).master_for(
        service, db=db, socket_timeout=timeout, socket_connect_timeout=0.5, decode_responses=True)


def master_port(client: redis.Redis) -> int | None:
    try:
        return int(client.connection_pool.get_master_address()[1])  # type: ignore[attr-defined]
    except (redis.RedisError, TypeError, AttributeError):
        return None


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class StreamTail(threading.Thread):
    """Copies every entry of the observed stream to ``stream_tail.jsonl`` as it appears.

    It reads only from the master the sentinels name at that moment (asked before every read, a new
    connection when it changes), never through a pooled connection that may still sit on a demoted master
    after a failover. Whenever the master changes, the entries read in the last VERIFY_WINDOW_S are checked
    on the new one: one that is not there vanished (it was on a master whose data did not survive, or not
    yet on the replica promoted), and a ``{"vanished": id, ...}`` line says so. (Without a change of master
    nothing read can vanish.) Then it reads the new master again from the oldest of those entries: the old
    master may have taken writes after the new one was promoted (a split brain), with ids above the new
    master's own entries of that moment, which reading on from the last id would skip. An entry read twice is
    the same entry (the checker keeps one); an entry is known by its id, plan and point, since two masters can
    give two entries one id.
    """

    VERIFY_WINDOW_S = 60.0

    def __init__(self, sentinels: list[tuple[str, int]], service: str, db: int, path: Path) -> None:
        super().__init__(name="chaos-stream-tail", daemon=True)
        self.sentinel = Sentinel(sentinels, sentinel_kwargs={"socket_timeout": 0.5})
        self.service, self.db = service, db
        self.path = path
        self.last_id = "0-0"
        self.stopping = threading.Event()
        self.read = 0
        # The entries read whose ids (Redis time, ms) are within VERIFY_WINDOW_S, by (id, plan, point), in order.
        self.recent: dict[tuple[str, str, str], None] = {}

    def run(self) -> None:
        client: redis.Redis | None = None
        address = None
        with open(self.path, "a") as out:
            while not self.stopping.is_set():
                try:
                    named = self.sentinel.discover_master(self.service)
                    if named != address or client is None:
                        client = redis.Redis(host=named[0], port=named[1], db=self.db, socket_timeout=2,
                                             socket_connect_timeout=0.5, decode_responses=True)
                        if address is not None and named != address:
                            self.verify(client, out, named[1])
                        address = named
                    reply = client.xread({STREAM: self.last_id}, count=2000, block=500)
                except (redis.RedisError, OSError):
                    client = None
                    self.stopping.wait(0.2)  # Redis away (a fault): read again soon
                    continue
                for _stream, entries in cast(Any, reply) or []:
                    for entry_id, fields in entries:
                        out.write(json.dumps({"id": entry_id, "port": named[1], "fields": fields}) + "\n")
                        self.last_id = entry_id
                        self.recent[(entry_id, fields.get("plan_id", ""), fields.get("obs_point", ""))] = None
                        self.read += 1
                out.flush()

    def verify(self, client: redis.Redis, out: Any, port: int) -> None:
        """On a change of master: mark the recently read entries the new master does not hold as vanished, and
        read it again from the oldest of them."""
        horizon = (time.time() - self.VERIFY_WINDOW_S) * 1000
        self.recent = {k: None for k in self.recent if _id(k[0])[0] >= horizon}
        if not self.recent:
            return
        oldest = next(iter(self.recent))[0]
        first = cast(Any, client.xrange(STREAM, count=1))
        kept_from = max(_id(oldest), _id(first[0][0])) if first else None  # older ones were trimmed: unknown
        held = {(entry_id, f.get("plan_id", ""), f.get("obs_point", ""))
                for entry_id, f in cast(Any, client.xrange(STREAM, min=oldest, max="+"))}
        for key in self.recent:
            if key not in held and kept_from is not None and _id(key[0]) >= kept_from:
                out.write(json.dumps({"vanished": key[0], "plan_id": key[1], "obs_point": key[2], "port": port})
                          + "\n")
        self.recent = {k: None for k in self.recent if k in held}
        self.last_id = min(self.last_id, oldest, key=_id)


    def finish(self, quiet_s: float = 1.0) -> None:
        """Stop once a read has come back empty (the stream has nothing newer), at most after 30 s."""
        deadline = time.monotonic() + 30
        seen = -1
        while time.monotonic() < deadline and seen != self.read:
            seen = self.read
            self.stopping.wait(quiet_s)
        self.stopping.set()
        self.join(5)


class MetricsTimeline(threading.Thread):
    """Scrapes the first worker that answers every second; keeps the lines of the count families."""

    FAMILIES = ("p28_observe_refused_total", "p28_late_obs_dropped_total", "p28_late_obs_lost_total")

    def __init__(self, ports: list[int], path: Path) -> None:
        super().__init__(name="chaos-metrics-timeline", daemon=True)
        self.ports, self.path = ports, path
        self.stopping = threading.Event()

    def run(self) -> None:
        with open(self.path, "a") as out:
            while not self.stopping.wait(1.0):
                for port in self.ports:
                    page = scrape(port) or ""
                    lines = [line for line in page.splitlines() if line.startswith(self.FAMILIES)]
                    if lines:  # (a worker that cannot read Redis leaves the counters out)
                        out.write(json.dumps({"t": time.time(), "port": port, "page": "\n".join(lines) + "\n"}) + "\n")
                        out.flush()
                        break


def write_final(client: redis.Redis, run_dir: Path, metrics_port: int | None) -> dict[str, Any]:
    """The final master's stream and inflight set, and a worker's /metrics, into the run's folder."""
    n = 0
    with open(run_dir / "stream_final.jsonl", "w") as out:
        start = "-"
        while True:
            page: Any = client.xrange(STREAM, min=start, count=5000)
            for entry_id, fields in page:
                out.write(json.dumps({"id": entry_id, "fields": fields}) + "\n")
            n += len(page)
            if len(page) < 5000:
                break
            start = "(" + page[-1][0]
    members: Any = client.zrange(INFLIGHT, 0, -1, withscores=True)
    (run_dir / "inflight.json").write_text(json.dumps({"members": [[m, s] for m, s in members]}))
    page_text = scrape(metrics_port) if metrics_port else None
    (run_dir / "metrics_end.prom").write_text(page_text or "")
    return {"final_entries": n, "inflight": len(members), "final_master": master_port(client),
            "metrics": bool(page_text)}
