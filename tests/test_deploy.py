"""Deployment files are code: the manifests and the Dockerfile are checked against the
server's real settings, ports, health service names, scripts and extras."""
from __future__ import annotations

import re

import k8s
import pytest
import tomllib
from conftest import ROOT

from service import settings as settings_mod
from service.server import LIVENESS, SERVICE
from service.settings import Settings

HEALTH_NAMES = {"", SERVICE, LIVENESS}  # what the server's health service answers for
SETTING_NAMES = settings_mod.variable_names()
docs = k8s.manifests
literal_env = k8s.literal_env


@pytest.fixture(scope="module")
def deployment() -> dict:
    d = k8s.deployment()
    assert d["kind"] == "Deployment"
    return d


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    return k8s.container(deployment)


def manifest_settings(container: dict, tmp_path) -> Settings:
    """The server's settings from the manifest's variables and mounted files."""
    return settings_mod.load([], env=k8s.pod_env(container, tmp_path))


def test_every_eagle_variable_is_a_setting_and_the_server_accepts_them(container,
                                                                       tmp_path) -> None:
    names = {e["name"] for e in container["env"]}
    assert names <= SETTING_NAMES, names - SETTING_NAMES
    s = manifest_settings(container, tmp_path)  # parses and passes the server's own checks
    assert s.auth_token == "s3cret"
    assert (s.host, s.port, s.insecure, s.device) == ("0.0.0.0", 50051, True, "cuda")
    assert s.model.startswith("/models/")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": s.port, "http": s.http_port, "metrics": s.metrics_port}
    # the tuning comes from the ConfigMap's file, mounted where EAGLE_CONFIG says
    config = literal_env(container)["EAGLE_CONFIG"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    assert (s.max_running, s.grace_seconds, s.default_deadline_s, s.log_format) == \
        (16, 600.0, 600.0, "json")
    assert s.max_connection_age_s > 0 and s.max_connection_age_grace_s >= s.max_connection_age_s


def test_probes_use_the_served_health_names_on_the_grpc_port(container) -> None:
    port = int(literal_env(container)["EAGLE_PORT"])
    probes = {k: container[k]["grpc"] for k in ("startupProbe", "readinessProbe",
                                                 "livenessProbe")}
    assert {p["port"] for p in probes.values()} == {port}
    assert {p["service"] for p in probes.values()} <= HEALTH_NAMES
    assert probes["readinessProbe"]["service"] == probes["startupProbe"]["service"] == SERVICE
    assert probes["livenessProbe"]["service"] == LIVENESS  # never kills a draining replica
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a model load


def test_the_pod_drains_within_its_termination_grace(deployment, container, tmp_path) -> None:
    """The drain is as long as the longest call, and the kubelet waits for all of it."""
    spec = deployment["spec"]["template"]["spec"]
    s = manifest_settings(container, tmp_path)
    assert s.grace_seconds >= s.default_deadline_s
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pause + s.drain_delay_s + s.grace_seconds
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gpu_model_volume_secrets_and_user(deployment, container) -> None:
    spec = deployment["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert literal_env(container)["EAGLE_MODEL"].startswith(mounts["models"]["mountPath"] + "/")
    assert mounts["models"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "persistentVolumeClaim" in volumes["models"]
    # the token is a file from a Secret: fail closed when it is missing
    path = literal_env(container)["EAGLE_AUTH_TOKEN_FILE"]
    assert path.startswith(mounts["token"]["mountPath"] + "/") and mounts["token"]["readOnly"]
    assert volumes["token"]["secret"]["secretName"] == "eagle-grpc-token"
    assert "optional" not in volumes["token"]["secret"]
    assert "EAGLE_AUTH_TOKEN" not in {e["name"] for e in container["env"]}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0


def test_services_and_budget_select_the_pods(deployment, container) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    services = {s["metadata"]["name"]: s for s in docs("service.yaml")}
    assert set(services) == {"eagle-grpc", "eagle-grpc-headless"}
    assert services["eagle-grpc-headless"]["spec"]["clusterIP"] == "None"
    port_names = {p["name"] for p in container["ports"]}
    for svc in services.values():
        assert svc["spec"]["selector"] == labels
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["targetPort"] in port_names and grpc_port["port"] == 50051
    [pdb] = docs("pdb.yaml")
    assert pdb["kind"] == "PodDisruptionBudget"
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1


def test_the_tls_patch_moves_probes_to_the_health_port(container, tmp_path) -> None:
    [patch] = docs("tls-patch.yaml")
    [c] = patch["spec"]["template"]["spec"]["containers"]
    assert c["name"] == container["name"]
    assert {e["name"] for e in c["env"]} <= SETTING_NAMES
    s = manifest_settings({**container, "env": container["env"] + c["env"]}, tmp_path)
    assert s.tls and s.insecure is False and s.health_port
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")["mountPath"]
    assert s.tls_cert.startswith(mount + "/") and s.tls_key.startswith(mount + "/")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == s.health_port
        assert c[probe]["grpc"]["service"] in HEALTH_NAMES
    assert {"name": "health", "containerPort": s.health_port} in c["ports"]


def test_the_dockerfile_matches_the_project() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = re.search(r"^ARG BASE=(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and base.endswith("runtime")
    assert re.search(r'^ENTRYPOINT \["eagle-serve"\]$', text, re.M)
    assert project["scripts"]["eagle-serve"] == "service.__main__:main"
    assert re.search(r'^HEALTHCHECK .*CMD \["eagle-health"\]$', text, re.M)
    assert "eagle-health" in project["scripts"]
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', text).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]) and "server" in extras
    user = re.search(r"^USER (\S+)$", text, re.M).group(1)
    assert user not in ("root", "0")
    assert f"EXPOSE {Settings.port}" in text
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        for part in path.split():
            assert (ROOT / part).exists(), part
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {p.split()[1].rstrip("/") for p in re.findall(r"^COPY (\S+ \S+)", text, re.M)}
    for package in packages["packages"]:  # every installed package's source is copied in
        top = packages["package-dir"].get(package.split(".")[0], package.split(".")[0])
        assert top.split("/")[0] in {c.lstrip("./") for c in copied}, package


def test_eagle_health_reports_the_liveness_of_a_server(server, capsys) -> None:
    from service.healthcheck import main

    assert main(["--server", server.target]) == 0
    assert capsys.readouterr().out.strip() == f"eagle-health: {server.target} liveness: SERVING"
    assert main(["--server", server.target, "--service", "eagle.v1.ChatService"]) == 0
    assert main(["--server", server.target, "--service", "nope", "--timeout", "2"]) == 1


def test_the_alert_rules_name_only_series_the_server_exports(tiny) -> None:
    import yaml
    from conftest import make_engine
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    [group] = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())[
        "groups"]
    rules = group["rules"]
    assert len(rules) == 6 and all(r["alert"] and r["annotations"]["summary"] for r in rules)
    metrics = Metrics()
    engine = make_engine(tiny)
    try:
        metrics.bind_engine(engine)
        exported = set(re.findall(r"(?m)^# TYPE (\w+) ", generate_latest(metrics.registry)
                                  .decode()))
    finally:
        engine.drain(0)
    samples = {f"{name}{suffix}" for name in exported
               for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    named = {m for r in rules for m in re.findall(r"\beagle_\w+", r["expr"])}
    assert named and named <= samples, named - samples
    # the operations page describes each of them, by name
    page = (ROOT / "docs" / "operations.md").read_text()
    assert [r["alert"] for r in rules if f"| `{r['alert']}` |" not in page] == []
