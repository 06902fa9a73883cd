"""docker-compose.yml, its Dockerfile, the env file, Prometheus/Alertmanager/Grafana provisioning and the
systemd unit.

No Docker engine is needed: the compose file is parsed with PyYAML, and checked with `docker-compose config`,
`promtool check config` and `amtool check-config` when those tools are on PATH (skipped without them, failed when
CI is set); the shipped Alertmanager config is also loaded by the real binary (Debian's prometheus-alertmanager).
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from observer_tasks.core.settings import Settings
from tests.conftest import cannot_run, poll, server_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / "deploy" / "observer.env"
UNIT = ROOT / "deploy" / "observer-worker.service"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = ROOT / "docs" / "prometheus" / "late-observer-rules.yml"
OBSERVER_SERVICES = ("worker", "flower", "demo")
#: Where each severity goes (docs/runbook.md, "Routes and inhibitions").
RECEIVER_OF = {"critical": "page", "warning": "ticket"}


def tool(*names: str) -> str:
    """The first of names on PATH; skip without any, or fail when CI is set."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' or '.join(names)} not on PATH (Debian: apt-get install -y docker-compose prometheus)"
    cannot_run(message)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key.isidentifier() and value == value.strip(), f"bad line {line!r}"
            values[key] = value
    return values


def test_services_and_commands(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert set(s) >= {"redis", "worker", "flower", "prometheus", "alertmanager", "grafana", "demo"}
    assert s["redis"]["image"] == "redis:7"
    assert s["worker"]["command"] == ["celery", "-A", "observer_tasks", "worker", "-Q", "late_obs"]
    # Scale-friendly: the worker publishes /metrics on an ephemeral loopback port per replica (a fixed
    # host port lets only one replica start) and has no fixed container name.
    assert "8043" in s["worker"]["expose"] and s["worker"]["ports"] == ["127.0.0.1::8043"]
    assert "container_name" not in s["worker"]
    flower = " ".join(s["flower"]["command"])
    assert flower.startswith("celery -A observer_tasks flower --port=5555")
    assert "--basic-auth=${FLOWER_BASIC_AUTH:?" in flower, "Flower must refuse to start without auth"
    assert any(p.endswith(":5555:5555") for p in s["flower"]["ports"])
    assert s["prometheus"]["image"].startswith("prom/prometheus")
    assert s["grafana"]["image"].startswith("grafana/grafana")
    assert s["alertmanager"]["image"].startswith("prom/alertmanager")
    assert "alertmanager" in s["prometheus"]["depends_on"]
    assert s["demo"]["profiles"] == ["demo"]
    assert s["demo"]["command"][:2] == ["observer-tasks", "demo"]
    for name in OBSERVER_SERVICES:
        assert s[name]["env_file"] == "deploy/observer.env", name
        assert s[name]["build"]["context"] == "." and s[name]["image"] == s["worker"]["image"], name
    # Only the demo is optional; host ports are loopback only.
    assert [n for n, svc in s.items() if "profiles" in svc] == ["demo"]
    for name, svc in s.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    # Warm shutdown gets time to finish.
    assert s["worker"]["stop_signal"] == "SIGTERM" and int(s["worker"]["stop_grace_period"].rstrip("s")) >= 30


def test_every_host_path_exists(compose: dict[str, Any]) -> None:
    paths = []
    for svc in compose["services"].values():
        if "build" in svc:
            context = svc["build"]["context"]
            paths += [context, f"{context}/{svc['build'].get('dockerfile', 'Dockerfile')}"]
        env_files = svc.get("env_file", [])
        paths += [env_files] if isinstance(env_files, str) else env_files
        paths += [v.split(":")[0] for v in svc.get("volumes", []) if v.startswith((".", "/"))]
    assert len(paths) > 8
    for p in paths:
        assert (ROOT / p).exists(), f"docker-compose.yml refers to {p}, which is not in the repo"


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert re.search(r"pip install \. ", text) and "flower" in text
    assert "USER observer" in text and "EXPOSE 8043" in text
    assert '"celery", "-A", "observer_tasks", "worker", "-Q", "late_obs"' in text


def test_env_file_holds_every_variable_at_its_default() -> None:
    values = read_env_file(ENV_FILE)
    assert Settings.from_env(values) == Settings(redis_url="redis://redis:6379/0")
    text = ENV_FILE.read_text()
    for f in dataclasses.fields(Settings):
        assert re.search(rf"^(# )?{f.metadata['env']}=", text, re.M), f"{f.metadata['env']} is not in the env file"


def test_prometheus_and_grafana_provisioning(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert set(jobs) == {"late-observer", "flower"}
    # Every worker replica: the compose service name resolves to each one (not one static target).
    observer = jobs["late-observer"]
    assert "static_configs" not in observer
    assert observer["dns_sd_configs"] == [{"names": ["worker"], "type": "A", "port": 8043, "refresh_interval": "15s"}]
    assert jobs["flower"]["static_configs"] == [{"targets": ["flower:5555"]}]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    for rule_file in prom["rule_files"]:
        assert str(Path("/etc/prometheus") / rule_file) in mounts.values(), f"rule file {rule_file} is not mounted"
    # Alerts leave Prometheus for the compose service alertmanager, on the port it listens on.
    (target,) = [t for am in prom["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    assert host == "alertmanager" and host in compose["services"] and port == "9093"
    assert any(p.endswith(f":{port}:{port}") for p in compose["services"]["alertmanager"]["ports"])
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/late-observer.yml").read_text())
    dash_dir = providers["providers"][0]["options"]["path"]
    grafana = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert grafana["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana["./docs/grafana"] == dash_dir and (ROOT / "docs/grafana/late-observer.json").exists()


def test_promtool_check_config_as_mounted(compose: dict[str, Any], tmp_path: Path) -> None:
    """Lay the prometheus service's mounts out under tmp_path as in the container, then check the config."""
    promtool = tool("promtool")
    for volume in compose["services"]["prometheus"]["volumes"]:
        src, dst = volume.split(":")[:2]
        target = tmp_path / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / src, target)
    config = tmp_path / "etc/prometheus/prometheus.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout and re.search(r"SUCCESS: [1-9]\d* rules found", result.stdout)


def test_alertmanager_service_loads_the_shipped_config(compose: dict[str, Any]) -> None:
    am = compose["services"]["alertmanager"]
    flag = next(a for a in am["command"] if a.startswith("--config.file="))
    mounts = dict(v.split(":")[:2] for v in am["volumes"])
    assert mounts["./deploy/alertmanager/alertmanager.yml"] == flag.split("=", 1)[1]


def alertmanager_config() -> dict[str, Any]:
    return dict(yaml.safe_load(ALERTMANAGER.read_text()))


def alert_rules() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def test_amtool_check_config() -> None:
    result = subprocess.run([tool("amtool"), "check-config", str(ALERTMANAGER)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_routes_by_its_severity() -> None:
    """amtool's own routing: each alert of the rules file, with its labels, reaches page (critical) or ticket."""
    amtool = tool("amtool")
    for name, rule in alert_rules().items():
        labels = [f"alertname={name}", *(f"{k}={v}" for k, v in rule["labels"].items())]
        result = subprocess.run([amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.split() == [RECEIVER_OF[rule["labels"]["severity"]]], (name, result.stdout)


def test_inhibitions_name_real_alerts_and_are_explained() -> None:
    """Every inhibition's source and target match alerts of the rules file (a typo would inhibit nothing), no
    alert inhibits itself, the cause label they match is one the rules carry, and the runbook states each."""
    names = set(alert_rules())
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    section = runbook[runbook.index("### Routes and inhibitions"):]
    section = section[:section.index("\n### ", 1)]
    inhibitions = alertmanager_config()["inhibit_rules"]
    assert len(inhibitions) >= 5

    def matched(matchers: list[str]) -> set[str]:
        (alert,) = [m for m in matchers if m.startswith("alertname")]
        op, value = re.fullmatch(r'alertname(=~|=)"([^"]+)"', alert).groups()  # type: ignore[union-attr]
        found = {n for n in names if re.fullmatch(value, n)} if op == "=~" else {value} & names
        assert found and (op == "=" or len(value.split("|")) == len(found)), f"{alert} matches {found}"
        for m in matchers:
            if m.startswith("cause"):
                assert re.fullmatch(r'cause=~?"[a-z_|]+"', m), m
        return found

    for rule in inhibitions:
        sources, targets = matched(rule["source_matchers"]), matched(rule["target_matchers"])
        assert not sources & targets, rule
        for name in sources | targets:
            assert name in section, f"the runbook's routes and inhibitions do not mention {name}"


def test_the_real_alertmanager_loads_the_shipped_config(tmp_path: Path) -> None:
    exe = tool("prometheus-alertmanager", "alertmanager")
    port = server_port(20)
    log = tmp_path / "alertmanager.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, f"--config.file={ALERTMANAGER}", f"--storage.path={tmp_path}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def status() -> Any:
            if proc.poll() is not None:
                return {"exited": proc.returncode}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/status", timeout=1) as resp:
                    return json.loads(resp.read())
            except OSError:
                return None
        loaded = poll(status, 30, 0.1, "Alertmanager answering")
        assert "exited" not in loaded, log.read_text()
        config = yaml.safe_load(loaded["config"]["original"])
        assert {r["name"] for r in config["receivers"]} == set(RECEIVER_OF.values())
        assert len(config["inhibit_rules"]) == len(alertmanager_config()["inhibit_rules"])
    finally:
        proc.terminate()
        proc.wait(10)


def test_docker_compose_config() -> None:
    exe = tool("docker-compose")
    env = {**os.environ, "FLOWER_BASIC_AUTH": "user:password"}
    ok = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    env.pop("FLOWER_BASIC_AUTH")
    refused = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "FLOWER_BASIC_AUTH" in refused.stdout + refused.stderr


def test_an_operators_install_brings_flower() -> None:
    """The `flower` extra, installed by the unit file's instructions and named in the README (Flower was only a
    test extra, so an operator's `pip install` of the package had none)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["flower"] == ["flower>=2.2"]
    assert re.search(r"pip install '\S+\[flower\]'", UNIT.read_text())
    assert "observer-tasks[flower]" in (ROOT / "README.md").read_text()


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    svc = unit["Service"]
    assert svc["ExecStart"].endswith("celery -A observer_tasks worker -Q late_obs")
    # The apply layer's file, then the worker's own (optional: its Redis ACL user), which wins where both set a
    # variable. configparser keeps only the last of repeated keys, so these are read as lines.
    files = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith("EnvironmentFile=")]
    assert files == ["/etc/quantum/apply-layer.env", "-/etc/quantum/observer-worker.env"]
    assert svc["Restart"] == "on-failure"
    assert svc["User"] not in ("", "root")
    assert svc["KillSignal"] == "SIGTERM" and svc["KillMode"] == "mixed"
    assert int(svc["TimeoutStopSec"].rstrip("s")) >= 60, "warm shutdown needs time (a record may wait 30 s)"
    assert svc["RestartPreventExitStatus"] == "2", "a refused setting (exit 2) must not restart in a loop"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
