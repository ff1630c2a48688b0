"""The deployment files under docker/, checked offline: the Kubernetes manifests against the
API's schemas (the kubernetes-validate package, strict: unknown fields fail), the nginx
configuration in the ConfigMap equal to docker/nginx.conf (which tests/python/test_scaleout.py
runs), and docker/compose.yaml naming the replicas and ports that configuration routes to."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, List

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

DOCKER = REPO / "docker"
K8S_VERSION = "1.30.0"  # the oldest release the manifests use features of (gRPC probes: 1.27)


def documents(path: Path) -> List[Dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_manifests() -> List[Dict[str, Any]]:
    docs = [d for p in sorted((DOCKER / "k8s").glob("*.yaml")) for d in documents(p)]
    assert docs, "no manifests under docker/k8s"
    return docs


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_manifests_validate_against_the_api_schemas(version: str) -> None:
    kinds = []
    for doc in all_manifests():
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    for kind in ("Deployment", "StatefulSet", "Service", "ConfigMap"):
        assert kind in kinds, kind


def test_the_validator_refuses_a_broken_manifest() -> None:
    doc = copy.deepcopy(next(d for d in all_manifests() if d["kind"] == "StatefulSet"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_configmap_holds_docker_nginx_conf() -> None:
    maps = [d for d in all_manifests() if d["kind"] == "ConfigMap"]
    assert len(maps) == 1
    assert maps[0]["data"]["nginx.conf"] == (DOCKER / "nginx.conf").read_text()


def upstream_servers(conf: str) -> List[str]:
    return re.findall(r"^\s*server (replica-\d+:\d+)", conf, re.M)


def test_replicas_are_named_as_nginx_routes_to_them() -> None:
    conf = (DOCKER / "nginx.conf").read_text()
    servers = upstream_servers(conf)
    assert sorted(servers) == sorted(
        f"replica-{i}:{port}" for i in range(3) for port in (50051, 8000)
    )
    docs = all_manifests()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert "--load-on-demand" in container["args"]
    assert "--http-listen=0.0.0.0:8000" in container["args"]
    assert "--listen=0.0.0.0:50051" in container["args"]
    for i in range(3):
        svc = services[f"replica-{i}"]
        assert svc["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": f"replica-{i}"}
        assert {p["port"] for p in svc["spec"]["ports"]} == {50051, 8000}


def test_compose_runs_the_replicas_nginx_routes_to() -> None:
    with (DOCKER / "compose.yaml").open() as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    for i in range(3):
        replica = services[f"replica-{i}"]
        assert replica["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    assert {"50051:50051", "8000:8000"} <= set(services["nginx"]["ports"])
    # The replicas run the image's entrypoint: the ports nginx.conf routes to, adapters on demand.
    dockerfile = (DOCKER / "Dockerfile.cpu").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*?\])$", dockerfile, re.M | re.S)
    assert entry is not None
    args = yaml.safe_load(entry.group(1).replace("\\\n", ""))
    for flag, value in [("--listen", "0.0.0.0:50051"), ("--http-listen", "0.0.0.0:8000")]:
        assert args[args.index(flag) + 1] == value
    assert "--load-on-demand" in args and "--adapter-dir" in args
