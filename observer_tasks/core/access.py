"""The start-up access check: does Redis refuse the observer's user? Shared by the worker and `config check`."""

from __future__ import annotations

from .connections import failure_kind, redis_client
from .ledger import Ledger
from .settings import Settings
from .urls import redact_url


def access_problem(settings: Settings, timeout_s: float,
                   outages: list[tuple[str, str, Exception]] | None = None) -> str | None:
    """Why Redis refuses the observer's user, in one line naming the URL and Redis's reply; None when it does not.

    Asks REDIS_URL (a PING, then the steps' scripts with their keys: probe.lua) and a Redis broker (a PING).
    Redis that cannot be reached is an outage, not a configuration error: None, and the caller goes on;
    ``outages``, when given, collects (variable, URL, the failure) of each Redis that could not be asked.
    """
    urls = [("REDIS_URL", settings.redis_url)]
    if settings.broker_is_redis and settings.broker != settings.redis_url:
        urls.append((settings.broker_source, settings.broker))
    for name, url in urls:
        client = redis_client(url, timeout_s, "check", settings)
        try:
            client.ping()
            if name == "REDIS_URL":
                Ledger(settings, client).check_access()
        except Exception as exc:
            if failure_kind(exc) == "config_error":
                cause = exc.__cause__ or exc
                return (f"{name}={redact_url(url)}: Redis refuses the user ({type(cause).__name__}: {cause}): fix the "
                        "password in the URL or the user's ACL (deploy/redis/users.acl)")
            if outages is not None:
                outages.append((name, url, exc))
        finally:
            client.close()
    return None
