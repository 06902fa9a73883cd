"""Redis and broker URLs: the schemes the observer takes, the Sentinel form, kombu's form of it, redaction.

One URL form serves REDIS_URL and the broker: ``redis+sentinel://[user:pass@]h1[:p1][,h2[:p2]...]/service[/db]``
(``rediss+sentinel`` speaks TLS to the sentinels and the servers). The broker is handed to kombu in kombu's own
form (``sentinel://h1:p1;sentinel://h2:p2/db`` with ``master_name`` in the transport options).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

#: Redis through Sentinel; user:pass and the query (redis-py's ``ssl_*`` options) are the data servers'.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Sentinel's port when a host in a sentinel URL gives none.
SENTINEL_DEFAULT_PORT = 26379
#: Schemes that name a Redis Cluster, refused until it is built (docs/architecture.md#beyond-one-redis).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster", "redis-cluster", "cluster")
REDIS_SCHEMES = ("redis", "rediss", *SENTINEL_SCHEMES)
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


class URLError(ValueError):
    """A URL the observer cannot use; the message is one line, without the password."""


def is_redis(url: str) -> bool:
    return urlsplit(url).scheme in REDIS_SCHEMES


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def check_url(env: str, url: str, broker: bool) -> None:
    """Refuse, in one line, a URL the observer cannot use for this variable (``broker``: AMQP allowed)."""
    scheme = urlsplit(url).scheme
    shown = redact_url(url)
    if scheme in CLUSTER_SCHEMES or (scheme in ("redis", "rediss") and "," in urlsplit(url).netloc):
        raise URLError(f"{env}={shown!r}: Redis Cluster is not supported (each step's keys would need one "
                       "slot; docs/architecture.md#beyond-one-redis); use one server or redis+sentinel://")
    if scheme == "sentinel":
        raise URLError(f"{env}={shown!r}: write a Sentinel URL as redis+sentinel://host:port[,host:port]/"
                       "service[/db] (the broker is translated to kombu's form)")
    # No unix://: kombu has no such transport, so the broker (which may default to REDIS_URL) could not start.
    allowed = (*REDIS_SCHEMES, *AMQP_SCHEMES) if broker else REDIS_SCHEMES
    if scheme not in allowed:
        raise URLError(f"{env}={shown!r} must be a URL with scheme {'/'.join(allowed)}")
    if scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise URLError(f"{env}={shown!r}: {exc}") from None


class SentinelURL(NamedTuple):
    """A ``redis+sentinel://`` URL taken apart."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str
    password: str
    tls: bool
    query: str  # redis-py's URL options (ssl_cert_reqs, ssl_ca_certs, ...), applied to every connection

    @property
    def ssl_options(self) -> dict[str, str]:
        return dict(part.split("=", 1) for part in self.query.split("&") if part.startswith("ssl_") and "=" in part)

    def server_url(self) -> str:
        """A redis[s]:// URL with this URL's credentials, database and options, for redis-py to parse (its
        host is a placeholder: Sentinel names the master)."""
        return (f"{'rediss' if self.tls else 'redis'}://{self.userinfo()}sentinel-master/{self.db}"
                + (f"?{self.query}" if self.query else ""))

    def userinfo(self) -> str:
        if not (self.username or self.password):
            return ""
        return f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[user:pass@]h1[:p1][,h2[:p2]...]/service[/db][?query]``; ValueError says what is wrong."""
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    userinfo, _, hostpath = rest.rpartition("@")
    netloc, _, path = hostpath.partition("/")
    username, _, password = userinfo.partition(":")
    sentinels = []
    for part in netloc.split(","):
        match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?", part)
        if not match:
            raise ValueError(f"{part!r} is not a sentinel host[:port]")
        port = int(match.group(2) or SENTINEL_DEFAULT_PORT)
        if not 0 < port < 65_536:
            raise ValueError(f"sentinel port {port} is out of range")
        sentinels.append((match.group(1).strip("[]"), port))
    service, _, db = path.partition("/")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", service):
        raise ValueError("the path must name the Sentinel service: /service[/db]")
    if db and not re.fullmatch(r"\d{1,5}", db.rstrip("/")):
        raise ValueError(f"database {db!r} is not a number")
    return SentinelURL(sentinels, service, int(db.rstrip("/") or 0), unquote(username), unquote(password),
                       scheme == "rediss+sentinel", query)


def kombu_broker(url: str, sentinel_auth: dict[str, str]) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """The broker as kombu takes it: (URL, transport options to add, ``broker_use_ssl``).

    A ``redis+sentinel://`` broker becomes ``sentinel://h1:p1;sentinel://h2:p2/db`` with ``master_name`` and the
    sentinels' credentials (``sentinel_auth``) in the transport options; any other URL is kombu's as it is.
    """
    if not is_sentinel(url):
        return url, {}, None
    target = parse_sentinel_url(url)
    auth = target.userinfo()
    hosts = ";".join(f"sentinel://{auth}{_host(h)}:{p}/{target.db}" for h, p in target.sentinels)
    sentinel_kwargs: dict[str, Any] = {**sentinel_auth, "socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    ssl = None
    if target.tls:
        ssl = dict(target.ssl_options)
        sentinel_kwargs.update(ssl=True, **ssl)
    return hosts, {"master_name": target.service, "sentinel_kwargs": sentinel_kwargs}, ssl


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):(?P<password>.*)@(?P<tail>[^@]*)$")


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***', for logs and status output.

    Matched on the raw text (up to the last '@'), so a password holding '#', '?' or '/' is hidden too: kombu's
    ``maybe_sanitize_url`` parses the URL first and raises on such a password.
    """
    return _USERINFO.sub(r"\g<head>:***@\g<tail>", url)
