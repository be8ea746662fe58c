"""The server started as Kubernetes starts it: the Deployment's variables plus the "service
link" variables kubelet injects for every Service with a cluster IP in the namespace (when the
pod spec does not set enableServiceLinks: false), built here by kubelet's own rules from the
manifests' Services and from a user's Service named `eagle`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import grpc
import k8s
import pytest
from conftest import ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import free_port

from service import settings as settings_mod


def service_links(service: dict, cluster_ip: str) -> dict[str, str]:
    """What kubelet writes for one Service (pkg/kubelet/envvars): nothing for a headless one;
    else <NAME>_SERVICE_HOST/_SERVICE_PORT (the first port), _SERVICE_PORT_<PORT NAME> per
    named port, and the Docker-link style <NAME>_PORT (the first port's URL) and
    <NAME>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR] per port."""
    spec = service["spec"]
    if spec.get("clusterIP") in ("None", None) and spec.get("type", "ClusterIP") == "ClusterIP" \
            and "clusterIP" in spec:
        return {}
    name = service["metadata"]["name"].upper().replace("-", "_")
    ports = spec["ports"]
    env = {f"{name}_SERVICE_HOST": cluster_ip, f"{name}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        if port.get("name"):
            env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = \
                str(port["port"])
    first = ports[0]
    proto = first.get("protocol", "TCP")
    env[f"{name}_PORT"] = f"{proto.lower()}://{cluster_ip}:{first['port']}"
    for port in ports:
        proto = port.get("protocol", "TCP")
        prefix = f"{name}_PORT_{port['port']}_{proto.upper()}"
        env[prefix] = f"{proto.lower()}://{cluster_ip}:{port['port']}"
        env[f"{prefix}_PROTO"] = proto.lower()
        env[f"{prefix}_PORT"] = str(port["port"])
        env[f"{prefix}_ADDR"] = cluster_ip
    return env


OURS = {s["metadata"]["name"]: s for s in k8s.manifests("service.yaml")}
USERS_EAGLE = {"metadata": {"name": "eagle"},
               "spec": {"type": "ClusterIP", "ports": [{"name": "grpc", "port": 50051},
                                                       {"name": "metrics", "port": 9090}]}}


def kubelet_env(services: list[tuple[dict, str]], container: dict[str, str]) -> dict[str, str]:
    """The container's environment: service links first, the container's own variables over
    them (kubelet lets a variable the pod spec names win over a service link)."""
    env: dict[str, str] = {}
    for service, ip in services:
        env.update(service_links(service, ip))
    env.update(container)
    return env


def test_the_link_builder_follows_kubelets_rules() -> None:
    assert service_links(OURS["eagle-grpc-headless"], "None") == {}  # headless: none
    links = service_links(OURS["eagle-grpc"], "10.96.0.12")
    assert links == {
        "EAGLE_GRPC_SERVICE_HOST": "10.96.0.12", "EAGLE_GRPC_SERVICE_PORT": "50051",
        "EAGLE_GRPC_SERVICE_PORT_GRPC": "50051", "EAGLE_GRPC_SERVICE_PORT_HTTP": "8080",
        "EAGLE_GRPC_SERVICE_PORT_METRICS": "9090",
        "EAGLE_GRPC_PORT": "tcp://10.96.0.12:50051",
        "EAGLE_GRPC_PORT_50051_TCP": "tcp://10.96.0.12:50051",
        "EAGLE_GRPC_PORT_50051_TCP_PROTO": "tcp", "EAGLE_GRPC_PORT_50051_TCP_PORT": "50051",
        "EAGLE_GRPC_PORT_50051_TCP_ADDR": "10.96.0.12",
        "EAGLE_GRPC_PORT_8080_TCP": "tcp://10.96.0.12:8080",
        "EAGLE_GRPC_PORT_8080_TCP_PROTO": "tcp", "EAGLE_GRPC_PORT_8080_TCP_PORT": "8080",
        "EAGLE_GRPC_PORT_8080_TCP_ADDR": "10.96.0.12",
        "EAGLE_GRPC_PORT_9090_TCP": "tcp://10.96.0.12:9090",
        "EAGLE_GRPC_PORT_9090_TCP_PROTO": "tcp", "EAGLE_GRPC_PORT_9090_TCP_PORT": "9090",
        "EAGLE_GRPC_PORT_9090_TCP_ADDR": "10.96.0.12"}


def test_the_pod_spec_turns_service_links_off() -> None:
    assert k8s.deployment()["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_service_links_are_set_aside_and_a_typo_is_still_refused(tmp_path) -> None:
    container = k8s.pod_env(k8s.container(), tmp_path)
    env = kubelet_env([(s, "10.96.0.12") for s in OURS.values()]
                      + [(USERS_EAGLE, "10.96.0.77")], container)
    loaded = settings_mod.load_all([], env=env)
    links = {k for k in env if k.startswith("EAGLE_") and k not in container}
    assert set(loaded.ignored_variables) == links and len(links) == 30
    # EAGLE_PORT is the Deployment's own 50051 (it wins over the `eagle` Service's link)
    assert (loaded.settings.port, loaded.settings.metrics_port) == (50051, 9090)
    # without the Deployment's EAGLE_PORT, the `eagle` Service's tcp:// URL is a link, not a
    # port: the default holds
    bare = kubelet_env([(USERS_EAGLE, "10.96.0.77")], {})
    assert bare["EAGLE_PORT"] == "tcp://10.96.0.77:50051"
    loaded = settings_mod.load_all([], env=bare)
    assert loaded.settings.port == 50051 and "EAGLE_PORT" in loaded.ignored_variables
    # a link-shaped name with a value of another shape is no link: still refused
    with pytest.raises(ValueError) as info:
        settings_mod.load([], env={**bare, "EAGLE_MAX_RUNING": "4"})
    assert str(info.value).startswith(
        "unknown setting variable: EAGLE_MAX_RUNING (did you mean EAGLE_MAX_RUNNING?)")
    with pytest.raises(ValueError, match="^EAGLE_PORT='5005x' is not a valid int$"):
        settings_mod.load([], env={"EAGLE_PORT": "5005x"})
    with pytest.raises(ValueError, match="^unknown setting variable: EAGLE_GRPC_PORT;"):
        settings_mod.load([], env={"EAGLE_GRPC_PORT": "50051"})  # not a tcp:// URL


def test_the_server_starts_to_serving_with_what_kubelet_gives_it(tmp_path, tiny_dir) -> None:
    """The Deployment's variables (the model, device, port and host made local) plus every
    service link of the manifests' Services and of a Service named `eagle`: SERVING, and
    one INFO line naming the variables it ignored."""
    port, metrics, http = free_port(), free_port(), free_port()
    container = {**k8s.pod_env(k8s.container(), tmp_path), "EAGLE_MODEL": "tiny", "EAGLE_DEVICE": "cpu", "EAGLE_HOST": "127.0.0.1",
                 "EAGLE_PORT": str(port), "EAGLE_METRICS_PORT": str(metrics),
                 "EAGLE_HTTP_PORT": str(http),
                 "EAGLE_METRICS_HOST": "127.0.0.1", "EAGLE_CACHE_DIR": str(tiny_dir.parent),
                 "EAGLE_ENGINE_PROCESS": "false", "EAGLE_LOG_FORMAT": "text"}
    env = kubelet_env([(s, "10.96.0.12") for s in OURS.values()]
                      + [(USERS_EAGLE, "10.96.0.77")], container)
    env.update(PATH=os.environ["PATH"], PYTHONPATH=f"{ROOT}:{ROOT / 'protos'}",
               HOME=os.environ.get("HOME", "/tmp"))
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        status, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(
                    service="eagle.v1.ChatService"), timeout=2).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, log.read_text()[-3000:]
        channel.close()
        # the Deployment's HTTP port too, as an HTTP-only load balancer checks it
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=10) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    [line] = [x for x in text.splitlines() if "Kubernetes service-link variable" in x]
    assert "ignored 30 Kubernetes service-link variable(s): EAGLE_GRPC_PORT, " in line
    assert "EAGLE_PORT_50051_TCP_ADDR" in line and "EAGLE_SERVICE_HOST" in line
    assert "unknown setting" not in text
