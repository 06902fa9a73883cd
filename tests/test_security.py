"""Passwords and TLS work and never leak; the metrics server binds where it is told."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from observer_tasks import observe_late

from .conftest import HEAT, Worker, free_port, late_entries, poll, scrape

PASSWORD = "pw-Zq81xv"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server speaking only TLS, with a password."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "1", "-subj", "/CN=127.0.0.1"], cwd=tmp_path, check=True,
                   capture_output=True)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem", "--tls-ca-cert-file",
                             "cert.pem", "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "",
                             "--appendonly", "no"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=none"

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    poll(up, 10, what="TLS redis up")
    yield url
    proc.terminate()
    proc.wait(10)


def test_tls_and_password_work_and_never_leak(env: dict[str, str], tls_redis: str,
                                              start_worker: Callable[..., Worker]) -> None:
    env.update({"REDIS_URL": tls_redis, "CELERY_BROKER_URL": tls_redis})
    worker = start_worker()
    r = redis.Redis.from_url(tls_redis)
    assert observe_late("s1", "BTCUSDT") == "enqueued"
    # Heat after the admission, so the worker records it over TLS (heat written before the call would be recorded
    # by the admission itself: round-4 migration change 1).
    r.hset(HEAT + "s1", "heat_level", "hot")
    entry = poll(lambda: late_entries(r), what="the plan observed over TLS")[0]
    assert entry["heat_reason"] == "ok" and entry["recorded_by"] in ("wake", "look")
    assert PASSWORD not in worker.output()
    assert PASSWORD not in (scrape(worker.metrics_port) or "")


def test_metrics_bind_address(env: dict[str, str], start_worker: Callable[..., Worker]) -> None:
    env["P28_METRICS_ADDR"] = "127.0.0.2"
    worker = start_worker(wait=False)
    poll(lambda: scrape_at("127.0.0.2", worker.metrics_port), timeout=30, what="metrics on 127.0.0.2")
    assert scrape(worker.metrics_port) is None  # not on 127.0.0.1


def scrape_at(host: str, port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_bad_password_is_an_error_not_a_crash(env: dict[str, str], tls_redis: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """"error", and the one line says Redis refused the password (its WRONGPASS reply), with no traceback:
    not any failure (a bug, a TLS error, a timeout) that also ends in "error"."""
    env["REDIS_URL"] = tls_redis.replace(PASSWORD, "wrong")
    env["CELERY_BROKER_URL"] = tls_redis
    caplog.set_level(logging.WARNING, "observer_tasks")
    # "error" when Redis's WRONGPASS arrives within the call's cap; "deferred" when the TLS handshake takes longer
    # (a loaded machine): the outbox thread then meets the same refusal. Either way Redis's reply is logged.
    assert {observe_late("s1", "BTCUSDT"), observe_late("s2", "BTCUSDT")} <= {"error", "deferred"}

    def refusals() -> list[str]:
        return [rec.getMessage() for rec in caplog.records if "invalid username-password pair" in rec.getMessage()]

    lines = poll(refusals, 10, what="the WRONGPASS reply logged")
    assert all("configuration error" in line or "refused by Redis" in line for line in lines), caplog.text
    assert "Traceback" not in caplog.text and not [rec for rec in caplog.records if rec.exc_info]
    assert not [line for line in lines if "wrong" in line]  # the password is not logged, not even the wrong one


