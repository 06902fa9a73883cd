"""The settings object: defaults, strict parsing, one-line refusals."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from observer_tasks.core import timings as T
from observer_tasks.core.settings import (
    FALSE_WORDS,
    LATE_POINT,
    MAX_OBS_POINTS,
    TRUE_WORDS,
    Settings,
    SettingsError,
)
from observer_tasks.core.urls import parse_sentinel_url, redact_url

VARIABLES = {f.metadata["env"]: f for f in dataclasses.fields(Settings)}
INT_VARS = [env for env, f in VARIABLES.items() if f.type == "int"]
BOOL_VARS = [env for env, f in VARIABLES.items() if f.type == "bool"]


def test_defaults_are_the_contracts() -> None:
    s = Settings.from_env({})
    assert s.as_env() == {
        "P28_HEAT_OBS_ENABLED": "true",
        "P28_HEAT_OBS_POINTS": "create_apply_plan,reconcile_close_consume",
        "P28_HEAT_OBS_STREAM": "quantum:stream:apply.heat.observed",
        "P28_HEAT_LOOKUP_PREFIX": "quantum:harvest:heat:by_plan:",
        "P28_DEDUPE_TTL_SEC": "600",
        "P28_MAX_DEBUG_CHARS": "400",
        "P28_LATE_OBS_ENABLED": "true",
        "P28_LATE_OBS_MAX_WAIT_MS": "2000",
        "P28_LATE_OBS_POLL_MS": "100",
        "P28_LATE_OBS_MAX_WORKERS": "4",
        "P28_LATE_OBS_MAX_INFLIGHT": "200",
        "P28_LATE_OBS_WAKE": "true",
        "P28_LATE_OBS_SAFETY_POLL_MS": "2000",
        "P28_LATE_OBS_QUEUE_TYPE": "classic",
        "P28_REPLICA_WAIT_MS": "0",
        "REDIS_URL": "redis://localhost:6379/0",
        "P28_LATE_OBS_BROKER_URL": "",
        "CELERY_BROKER_URL": "",
        "P28_SENTINEL_USERNAME": "",
        "P28_SENTINEL_PASSWORD": "",
        "P28_METRICS_PORT": "8043",
        "P28_METRICS_ADDR": "0.0.0.0",
        "P28_KOMBU_GUARD": "true",
    }
    assert s.broker == s.redis_url and s.broker_source == "REDIS_URL"
    assert s.early_points == ("create_apply_plan", "reconcile_close_consume")
    assert s.obs_points == ("create_apply_plan", "reconcile_close_consume", LATE_POINT)


def test_startup_lines() -> None:
    assert Settings().startup_lines() == [
        "P2.8A Heat Observer: True",
        "P2.8A.3 Late Observer: True (wait=2000ms, poll=100ms, workers=4, max_inflight=200)",
    ]
    assert Settings.from_env({"P28_LATE_OBS_ENABLED": "false"}).startup_lines()[1] == "P2.8A.3 Late Observer: False"


@pytest.mark.parametrize("word", sorted(TRUE_WORDS | {w.upper() for w in TRUE_WORDS} | {" on "}))
def test_true_words(word: str) -> None:
    assert Settings.from_env({"P28_LATE_OBS_ENABLED": word}).late_obs_enabled is True


@pytest.mark.parametrize("word", sorted(FALSE_WORDS | {"Off", "NO"}))
def test_false_words(word: str) -> None:
    assert Settings.from_env({"P28_HEAT_OBS_ENABLED": word}).heat_obs_enabled is False


@pytest.mark.parametrize("env", BOOL_VARS)
@pytest.mark.parametrize("value", ["", "maybe", "2", "truee", "-1"])
def test_bad_booleans_are_refused_in_one_line(env: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({env: value})
    assert str(info.value).startswith(f"{env}={value!r}") and "\n" not in str(info.value)


@pytest.mark.parametrize("env", INT_VARS)
@pytest.mark.parametrize("value", ["", "-5", "abc", "1.5", "99999999999999999999", "1e3"])
def test_bad_numbers_are_refused_in_one_line(env: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({env: value})
    assert str(info.value).startswith(f"{env}={value!r}") and "\n" not in str(info.value)


@pytest.mark.parametrize("env", INT_VARS)
def test_each_number_has_bounds(env: str) -> None:
    f = VARIABLES[env]
    with pytest.raises(SettingsError, match="out of range"):
        Settings.from_env({env: str(f.metadata["hi"] + 1)})
    if f.metadata["lo"] > 0:
        with pytest.raises(SettingsError, match="out of range"):
            Settings.from_env({env: str(f.metadata["lo"] - 1)})


@pytest.mark.parametrize("env", ["P28_HEAT_OBS_STREAM", "P28_HEAT_LOOKUP_PREFIX", "REDIS_URL", "P28_METRICS_ADDR"])
@pytest.mark.parametrize("value", ["", "  ", "a b"])
def test_bad_strings_are_refused(env: str, value: str) -> None:
    with pytest.raises(SettingsError, match=env):
        Settings.from_env({env: value})


def test_poll_above_wait_is_refused() -> None:
    with pytest.raises(SettingsError, match="P28_LATE_OBS_POLL_MS=3000 is above P28_LATE_OBS_MAX_WAIT_MS=2000"):
        Settings.from_env({"P28_LATE_OBS_POLL_MS": "3000"})


def test_urls() -> None:
    assert Settings.from_env({"REDIS_URL": "rediss://:pw@h:6380/2"}).broker == "rediss://:pw@h:6380/2"
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"REDIS_URL": "http://:secret@h/0"})
    assert "secret" not in str(info.value)
    s = Settings.from_env({"REDIS_URL": "redis://u:secret@h:1/0", "CELERY_BROKER_URL": "amqp://g:secret2@h//"})
    assert "secret" not in str(s.as_env()) and s.as_env()["REDIS_URL"] == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("redis://:p#s?s/w@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:a@b@[::1]:6380/0?ssl_cert_reqs=none") == "rediss://user:***@[::1]:6380/0?ssl_cert_reqs=none"
    assert redact_url("amqp://guest:guest@host:5672//") == "amqp://guest:***@host:5672//"


def test_sources() -> None:
    src = Settings.sources({"P28_LATE_OBS_POLL_MS": "50"})
    assert src["P28_LATE_OBS_POLL_MS"] == "env" and src["P28_LATE_OBS_MAX_WAIT_MS"] == "default"


@given(st.text(max_size=30))
def test_boolean_parser_accepts_exactly_its_words(text: str) -> None:
    word = text.strip().lower()
    try:
        value = Settings.from_env({"P28_LATE_OBS_ENABLED": text}).late_obs_enabled
    except SettingsError:
        assert word not in TRUE_WORDS | FALSE_WORDS
    else:
        assert value is (word in TRUE_WORDS) and word in TRUE_WORDS | FALSE_WORDS


@given(st.text(max_size=25))
def test_number_parser_accepts_only_in_range_integers(text: str) -> None:
    try:
        value = Settings.from_env({"P28_LATE_OBS_MAX_INFLIGHT": text}).late_obs_max_inflight
    except SettingsError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("P28_LATE_OBS_MAX_INFLIGHT=")
    else:
        assert 1 <= value <= 1_000_000 and value == int(text.strip())


@given(st.integers(min_value=10, max_value=60_000), st.integers(min_value=1, max_value=600_000))
def test_poll_and_wait_combinations(poll_ms: int, wait_ms: int) -> None:
    env = {"P28_LATE_OBS_POLL_MS": str(poll_ms), "P28_LATE_OBS_MAX_WAIT_MS": str(wait_ms)}
    if poll_ms > wait_ms:
        with pytest.raises(SettingsError):
            Settings.from_env(env)
    else:
        s = Settings.from_env(env)
        assert (s.late_obs_poll_ms, s.late_obs_max_wait_ms) == (poll_ms, wait_ms)


def test_safety_poll_defaults_between_poll_and_max_wait() -> None:
    """Unset, the safety interval is MAX_WAIT_MS: a healthy wake path's plan has its one look at its deadline."""
    assert Settings().safety_poll_ms == 2000
    assert Settings.from_env({"P28_LATE_OBS_MAX_WAIT_MS": "300"}).safety_poll_ms == 300
    assert Settings.from_env({"P28_LATE_OBS_POLL_MS": "1500"}).safety_poll_ms == 2000
    assert Settings.from_env({"P28_LATE_OBS_SAFETY_POLL_MS": "250"}).safety_poll_ms == 250
    with pytest.raises(SettingsError, match=r"^P28_LATE_OBS_SAFETY_POLL_MS=50 is outside P28_LATE_OBS_POLL_MS=100"):
        Settings.from_env({"P28_LATE_OBS_SAFETY_POLL_MS": "50"})
    with pytest.raises(SettingsError, match="P28_LATE_OBS_MAX_WAIT_MS=2000"):
        Settings.from_env({"P28_LATE_OBS_SAFETY_POLL_MS": "2500"})


@pytest.mark.parametrize(("poll", "wait", "safety", "grace_ms", "visibility_s"), [
    # The values docs/configuration.md gives: grace max(1000, POLL_MS + 500, 3000 - MAX_WAIT_MS) ms (a final
    # look one POLL_MS late and its 0.5 s lookup; the sweeper decides by the same rule as a look, so a race
    # changes nothing: round-4 migration change 2, was max(5000, POLL_MS + 4000); and, since b333139, the apply
    # process's unsent note, written BROKER_PATIENCE_S after the call, with a second to spare); visibility
    # max(30, whole seconds of max(POLL_MS, SAFETY_POLL_MS) + 3000 ms, + 10) s (a countdown message parked, then
    # its run).
    (10, 10, "", 2990, 30),
    (100, 2000, "", 1000, 30),  # the defaults
    (1500, 2000, "", 2000, 30),
    (100, 60_000, "30000", 1000, 43),
    # SAFETY_POLL_MS unset is MAX_WAIT_MS since 15b12c4 (was 1000 clamped to POLL_MS..MAX_WAIT_MS): a countdown
    # parked for up to 600 s, so the visibility timeout covers it (was 73 s).
    (60_000, 600_000, "", 60_500, 613),
])
def test_interlocked_timings_cover_each_other(poll: int, wait: int, safety: str, grace_ms: int,
                                              visibility_s: int) -> None:
    env = {"P28_LATE_OBS_POLL_MS": str(poll), "P28_LATE_OBS_MAX_WAIT_MS": str(wait)}
    if safety:
        env["P28_LATE_OBS_SAFETY_POLL_MS"] = safety
    s = Settings.from_env(env)
    assert (s.sweep_grace_ms, s.visibility_timeout_s) == (grace_ms, visibility_s)


def test_unix_sockets_are_refused() -> None:
    with pytest.raises(SettingsError, match=r"^REDIS_URL='unix:///run/redis.sock' must be a URL with scheme redis/"):
        Settings.from_env({"REDIS_URL": "unix:///run/redis.sock"})


def test_sentinel_urls_for_data_and_broker() -> None:
    s = Settings.from_env({"REDIS_URL": "redis+sentinel://u:p%40ss@10.0.0.1:26380,s2,[::1]:5/obs/3",
                           "P28_SENTINEL_USERNAME": "sentinel-user", "P28_SENTINEL_PASSWORD": "s3cret"})
    target = parse_sentinel_url(s.redis_url)
    assert target.sentinels == [("10.0.0.1", 26380), ("s2", 26379), ("::1", 5)]
    assert (target.service, target.db, target.username, target.password, target.tls) == ("obs", 3, "u", "p@ss", False)
    # The broker defaults to REDIS_URL and is handed to kombu in its own form, master name in the options.
    url, options, ssl = s.celery_broker()
    assert url == ("sentinel://u:p%40ss@10.0.0.1:26380/3;sentinel://u:p%40ss@s2:26379/3;"
                   "sentinel://u:p%40ss@[::1]:5/3")
    assert options["master_name"] == "obs" and ssl is None
    assert options["sentinel_kwargs"]["username"] == "sentinel-user"
    assert options["sentinel_kwargs"]["password"] == "s3cret"
    shown = s.as_env()
    assert "s3cret" not in str(shown) and "p%40ss" not in str(shown) and shown["P28_SENTINEL_PASSWORD"] == "***"
    tls = Settings.from_env({"CELERY_BROKER_URL": "rediss+sentinel://h/obs?ssl_cert_reqs=none"})
    _url, options, ssl = tls.celery_broker()
    assert ssl == {"ssl_cert_reqs": "none"} and options["sentinel_kwargs"]["ssl"] is True
    assert Settings().celery_broker() == ("redis://localhost:6379/0", {}, None)


@pytest.mark.parametrize(("url", "why"), [
    ("redis+sentinel://h:1", "the path must name the Sentinel service"),
    ("redis+sentinel://h:1/", "the path must name the Sentinel service"),
    ("redis+sentinel://h:1/obs/x", "database 'x' is not a number"),
    ("redis+sentinel://h:99999/obs", "sentinel port 99999 is out of range"),
    ("redis+sentinel://h:1,,h2/obs", "'' is not a sentinel host"),
    ("sentinel://h:26379/0", "write a Sentinel URL as redis+sentinel://"),
    ("redis://:pw@h1:7000,h2:7001/0", "Redis Cluster is not supported"),
    ("redis+cluster://h:7000/0", "Redis Cluster is not supported"),
])
def test_bad_sentinel_and_cluster_urls_are_refused_in_one_line(url: str, why: str) -> None:
    for env in ("REDIS_URL", "CELERY_BROKER_URL"):
        with pytest.raises(SettingsError) as info:
            Settings.from_env({env: url})
        assert str(info.value).startswith(f"{env}=") and why in str(info.value) and "\n" not in str(info.value)
        assert ":pw@" not in str(info.value)


def test_the_broker_is_the_observers_own_variable_first() -> None:
    """P28_LATE_OBS_BROKER_URL, then CELERY_BROKER_URL, then REDIS_URL (round-4 migration change 8)."""
    data, celery, ours = "redis://h:1/0", "redis://h:1/5", "amqp://g:pw@rabbit:5672//"
    assert (Settings.from_env({"REDIS_URL": data}).broker, Settings.from_env({"REDIS_URL": data}).broker_source) == (
        data, "REDIS_URL")
    s = Settings.from_env({"REDIS_URL": data, "CELERY_BROKER_URL": celery})
    assert (s.broker, s.broker_source) == (celery, "CELERY_BROKER_URL")
    s = Settings.from_env({"REDIS_URL": data, "CELERY_BROKER_URL": celery, "P28_LATE_OBS_BROKER_URL": ours})
    assert (s.broker, s.broker_source, s.broker_is_redis) == (ours, "P28_LATE_OBS_BROKER_URL", False)
    assert s.broker_shown == "amqp://g:***@rabbit:5672//" and "pw" not in str(s.as_env())
    with pytest.raises(SettingsError, match="^P28_LATE_OBS_BROKER_URL='http://h/' must be a URL with scheme"):
        Settings.from_env({"P28_LATE_OBS_BROKER_URL": "http://h/"})


def test_quorum_queues_start_with_the_default_poll() -> None:
    """A quorum late_obs queue no longer refuses sub-second POLL_MS (round-4 migration change 8); it still needs
    RabbitMQ."""
    amqp = {"P28_LATE_OBS_BROKER_URL": "amqp://g:g@h//", "P28_LATE_OBS_QUEUE_TYPE": "quorum"}
    assert Settings.from_env(amqp).late_obs_poll_ms == 100
    assert Settings.from_env({**amqp, "P28_LATE_OBS_POLL_MS": "10", "P28_LATE_OBS_MAX_WAIT_MS": "50"})
    with pytest.raises(SettingsError, match="^P28_LATE_OBS_QUEUE_TYPE=quorum needs a RabbitMQ broker"):
        Settings.from_env({"P28_LATE_OBS_QUEUE_TYPE": "quorum"})
    with pytest.raises(SettingsError, match="^P28_LATE_OBS_QUEUE_TYPE='stream' is not one of classic/quorum"):
        Settings.from_env({"P28_LATE_OBS_QUEUE_TYPE": "stream"})


def test_replica_wait_is_bounded_to_a_second() -> None:
    """P28_REPLICA_WAIT_MS is 0-1000 (round-4 migration change 8: the outbox thread waits, off the caller's path)."""
    assert Settings.from_env({"P28_REPLICA_WAIT_MS": "1000"}).replica_wait_ms == 1000
    with pytest.raises(SettingsError, match=r"^P28_REPLICA_WAIT_MS='1001' is out of range \(0..1000\)"):
        Settings.from_env({"P28_REPLICA_WAIT_MS": "1001"})


@pytest.mark.parametrize("points", ["reconcile_close_consume", "a,b,c", ",".join(f"p{i}" for i in range(8))])
def test_early_observation_points_are_configured(points: str) -> None:
    """Any set of 1-8 point names (round-4 migration change 6); the first is observe()'s default."""
    s = Settings.from_env({"P28_HEAT_OBS_POINTS": points})
    assert s.early_points == tuple(points.split(",")) and s.obs_points[-1] == LATE_POINT


@pytest.mark.parametrize("points", ["", "a,a", "A", "1a", "a b", "a,,b", "x" * 41, LATE_POINT,
                                    "create_apply_plan,publish_plan_post", ",".join(f"p{i}" for i in range(9)),
                                    "create-apply-plan", "a:b"])
def test_bad_observation_points_are_refused_in_one_line(points: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"P28_HEAT_OBS_POINTS": points})
    assert str(info.value).startswith("P28_HEAT_OBS_POINTS=") and "\n" not in str(info.value)
    assert MAX_OBS_POINTS == 8


def test_the_fixed_timings_cover_each_other() -> None:
    """timings.py's interlocked constants, checked here (Settings derives the two that depend on settings)."""
    # A caller pays at most one call's cap; the outbox thread's own client waits a stall out for longer.
    assert T.CALL_TIMEOUT_S < T.OUTBOX_TIMEOUT_S and T.CALL_TIMEOUT_S < T.PUBLISH_TIMEOUT_S < T.EXIT_FLUSH_S < 1.0
    assert T.RETRY_S <= T.RETRY_MAX_S < T.RIDE_OUT_S and T.OUTBOX_BATCH <= T.OUTBOX_MAX
    # One healthy heartbeat vouches for the wake path four beats long; a heartbeat later than GAP_MIN_MS is a
    # gap, seen before the heartbeat's own socket timeout.
    assert T.WAKE_HEALTH_TTL_MS == 4 * T.HEARTBEAT_S * 1000
    assert T.HEARTBEAT_S * 1000 < T.GAP_MIN_MS <= T.MAIN_TIMEOUT_S * 1000
    # A gap is kept as long as any plan it may overlap can wait to be decided (the longest window and grace).
    longest = Settings(late_obs_max_wait_ms=600_000, late_obs_poll_ms=60_000)
    assert longest.late_obs_max_wait_ms + longest.sweep_grace_ms <= T.GAPS_KEEP_MS
    # A look's lookup fits in the least sweeper grace; a worker is stale before it is forgotten.
    assert T.LOOKUP_TIMEOUT_S * 1000 < T.MIN_SWEEP_GRACE_MS and T.WORKER_STALE_MS < T.WORKER_FORGET_MS
    assert T.WAKE_RECONNECT_S <= T.WAKE_RECONNECT_MAX_S and T.BREAKER_FIRST_OPEN_S <= T.BREAKER_MAX_OPEN_S
