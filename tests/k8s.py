"""The manifests in deploy/kubernetes as the container sees them: its environment, with the
files its volumes mount (the ConfigMap's keys, the Secret's token) written under a test's
folder and every path in a variable pointed there."""
from __future__ import annotations

from pathlib import Path

import yaml
from conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"


def manifests(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def deployment() -> dict:
    [d] = manifests("deployment.yaml")
    return d


def container(of: dict | None = None) -> dict:
    [c] = (of or deployment())["spec"]["template"]["spec"]["containers"]
    return c


def literal_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def pod_env(c: dict, folder: Path, token: str = "s3cret") -> dict[str, str]:
    """The container's literal variables, with each mounted volume's files made under
    `folder`: ConfigMaps from configmap.yaml (their keys as files), the token Secret as
    `token`; variables naming a path under a mount point now name the copy."""
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    maps = {m["metadata"]["name"]: m for m in manifests("configmap.yaml")}
    moved: dict[str, Path] = {}
    for mount in c.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        here = folder / mount["name"]
        if "configMap" in volume:
            here.mkdir(parents=True, exist_ok=True)
            for key, text in maps[volume["configMap"]["name"]]["data"].items():
                (here / key).write_text(text)
        elif "secret" in volume:
            here.mkdir(parents=True, exist_ok=True)
            (here / "token").write_text(token + "\n")
        else:
            continue
        moved[mount["mountPath"]] = here
    env = literal_env(c)
    for name, value in env.items():
        for mount_path, here in moved.items():
            if value.startswith(mount_path + "/"):
                env[name] = str(here / value[len(mount_path) + 1:])
    return env
