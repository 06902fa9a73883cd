"""`observer-tasks config check`: a configuration checked as the worker will read it, and whether it works.

Parse (an env file read as systemd reads it: envfile.py), validate (Settings, as the worker refuses), then,
unless --offline, ask what the configuration names: Redis (the worker's start-up access check) and the
broker. Exit codes: 2 and one line for a refused file, value or user (Redis's, or RabbitMQ's); 1 and one
line naming which of Redis and the broker cannot be reached or refuses to answer, and why.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import redis

from ..core.access import access_problem
from ..core.connections import describe
from ..core.settings import Settings, SettingsError
from ..core.urls import redact_url
from . import broker as B
from . import envfile
from . import probes as P
from .reports import broker_text, config_rows, table


@click.group()
def config() -> None:
    """Check configuration before deploying it."""


@config.command("check")
@click.option("--env-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=envfile.HELP + " [default: the environment]")
@click.option("--offline", is_flag=True,
              help="only parse and validate: ask neither Redis nor the broker (e.g. on a build host)")
def config_check(env_file: Path | None, offline: bool) -> None:
    """Validate settings the way the worker will, check that Redis and the broker answer, and show the values.

    With --env-file, the file is read exactly as systemd's EnvironmentFile=
    reads it, and a line that systemd, a shell or docker's env_file would read
    differently is refused. Exit 2 with one line naming the line (or the
    variable and the value) when the file or a value would be refused, as the
    worker refuses it. Then, unless --offline, it asks Redis and the broker as
    the worker will: exit 2 too when one refuses the user (Redis: a wrong
    password, WRONGPASS or NOAUTH, or a missing ACL permission for the
    observer's steps, NOPERM; RabbitMQ: ACCESS_REFUSED, or a vhost the user may
    not open), as the worker refuses to start on it; exit 1 with one line naming
    which (REDIS_URL, or the broker's variable) and why when it cannot be
    reached or refuses to answer (BUSY, LOADING ...). The broker is
    P28_LATE_OBS_BROKER_URL, else CELERY_BROKER_URL, else REDIS_URL: the output
    says which. Unknown P28_* names (typos) are warned about.

    \b
    Examples:
      observer-tasks config check --env-file /etc/quantum/apply-layer.env
      observer-tasks config check          # the current environment
      observer-tasks config check --env-file deploy/observer.env --offline   # no Redis or broker asked
    """
    if env_file:
        try:
            parsed = envfile.read(env_file)
        except envfile.EnvFileError as exc:
            raise P.Refused(str(exc)) from None
        values, origin = parsed.values, parsed.lines
    else:
        values, origin = dict(os.environ), {}
    try:
        settings = Settings.from_env(values)
    except SettingsError as exc:
        where = f"{env_file}:{origin[exc_name]}" if (exc_name := refused_name(str(exc), origin)) else None
        raise P.Refused(f"{where or env_file or 'environment'}: {exc}") from None
    if not offline:
        ask(settings, str(env_file or "environment"))
    sources = {name: (f"{env_file}:{origin[name]}" if name in origin else source)
               for name, source in Settings.sources(values).items()}
    click.echo(table(("variable", "value", "source"), config_rows(settings, sources)))
    click.echo(f"broker: {broker_text(settings)}")
    click.echo("not asked (--offline): Redis, the broker" if offline else
               "asked: Redis answers and accepts the user; the broker answers")
    for name in sorted(set(values) - set(sources)):
        if name.startswith("P28_"):
            click.echo(f"warning: {name} is not a setting of the observer (typo?); it is ignored", err=True)


def refused_name(message: str, origin: dict[str, int]) -> str | None:
    """The variable a refusal names first, when the file set it (for path:line in the message)."""
    name = message.split("=", 1)[0]
    return name if name in origin else None


def ask(settings: Settings, where: str) -> None:
    """Ask Redis and the broker as the worker will: P.Refused (exit 2) when one refuses the user, a one-line
    click exception (exit 1) naming each that cannot be reached or refuses to answer."""
    outages: list[tuple[str, str, Exception]] = []
    refused = access_problem(settings, P.CLI_TIMEOUT_S, outages)
    if refused:
        raise P.Refused(f"{where}: {refused}")
    problems = [f"{name}={redact_url(url)}: {unanswered('Redis', exc)}"
                + (" (it is the broker too)" if name == "REDIS_URL" == settings.broker_source else "")
                for name, url, exc in outages]
    if not settings.broker_is_redis:
        named = f"{settings.broker_source}={redact_url(settings.broker)}"
        failure = B.broker_failure(settings)
        if isinstance(failure, B.AMQP_REFUSALS):
            raise P.Refused(f"{where}: {named}: the broker refuses the user ({type(failure).__name__}: {failure}): "
                            "fix the user, password or vhost in the URL")
        if failure is not None:
            problems.append(f"{named}: {unanswered('the broker', failure)}")
    if problems:
        raise click.ClickException(f"{where}: " + "; ".join(problems))


def unanswered(what: str, exc: Exception) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, redis.ResponseError):
        return f"{what} refuses to answer ({describe(exc)})"
    return f"cannot reach {what} ({describe(exc)})"
