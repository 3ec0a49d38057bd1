"""deploy/: the compose file brought up for real, and the Kubernetes manifests
checked as far as a machine without a cluster can (issue 16, "Deployment").

The compose stack (three gateways, Redis with AOF, HAProxy) runs under
podman-compose, with the images test_container.py's plan builds: on this
project's machines, ``../shared/tools/container-base.sh`` (no registry: the
gateway image from a local Debian base; Redis and HAProxy as Debian's packages
on that base, since their official images cannot be pulled), elsewhere any
working podman. Without an engine or a base image it skips exactly as the
container tests do, and fails instead in CI. podman-compose itself comes from
Debian's package, installed if missing (never a skip once an engine works).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import build_config
from tests.e2e.test_container import Plan, _plan_or_skip, _run
from tests.support import ROOT
from tests.support.gateway import free_port
from tests.support.waiting import until_sync

DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
TAG = os.getpid()
GATEWAY_IMAGE = f"localhost/wx-gateway-compose:{TAG}"
SIDECAR_IMAGE = f"localhost/wx-gateway-compose-deps:{TAG}"  # redis-server + haproxy
PROJECT = f"wxgw-compose-{TAG}"
INSTALL_COMPOSE = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y podman-compose"
)
SIDECAR = """\
FROM localhost/bookworm-python:base
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server haproxy \\
 && rm -rf /var/lib/apt/lists/*
"""
ENV = {
    "WECHAT_APPID": "wx0000000000fake00",
    "WECHAT_SECRET": "compose-wechat-secret",
    "WECHAT_FAKE": "true",  # each instance answers WeChat in-process: no credentials
    "GATEWAY_TOKEN_SECRET": "compose-test-token-secret-0123456789-abcdef",
    "REDIS_PASSWORD": "compose-redis-password",
    "UPSTREAM": "http://upstream:9000",
}


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def test_kubernetes_probes_ports_and_secret_refs_fit_together() -> None:
    objects = manifests()
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert deployment["spec"]["replicas"] >= 2
    # The Service and the disruption budget select exactly the Deployment's pods.
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    # The image's numeric user (the Dockerfile's USER), so runAsNonRoot can check it.
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile has no numeric USER"
    security = pod["spec"]["securityContext"]
    assert (security["runAsNonRoot"], str(security["runAsUser"])) == (True, user.group(1))
    # Longer than the drain and the grace together, or the kubelet kills mid-drain.
    config = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    server = config["server"]
    drain = float(server["drain_delay"].rstrip("s")) + float(server["shutdown_grace"].rstrip("s"))
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain


def test_kubernetes_config_loads_with_the_secret_and_names_redis() -> None:
    objects = manifests()
    secret, configmap = objects["Secret"], objects["ConfigMap"]
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert container["args"][-1] == f"{mounts['config']}/config.yaml"
    text = configmap["data"]["config.yaml"]
    # Every ${VAR} the config reads is a key of the Secret, and nothing secret is
    # written in the ConfigMap itself.
    wanted = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert wanted == set(secret["stringData"]), (wanted, sorted(secret["stringData"]))
    for value in secret["stringData"].values():
        assert value not in text
    # The real loader accepts it, with the values the Secret provides.
    config = build_config(yaml.safe_load(text), env=dict(secret["stringData"]))
    assert config.storage.url.startswith("redis://:change-me@redis.")
    # kustomization.yaml applies every manifest of the folder.
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(
        p.name for p in KUBE.glob("*.yaml") if p.stem != "kustomization"
    )


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def test_compose_file_has_three_gateways_redis_with_aof_and_haproxy_on_readyz() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "gw1", "gw2", "gw3", "haproxy"}
    for name in ("gw1", "gw2", "gw3"):
        assert "./gateway.yaml:/etc/wx-gateway/config.yaml:ro" in services[name]["volumes"]
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert (
        "./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"
        in (services["haproxy"]["volumes"])
    )
    haproxy = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert "option httpchk GET /readyz" in haproxy
    for name in ("gw1", "gw2", "gw3"):
        assert re.search(rf"^\s+server {name} {name}:8080 check", haproxy, re.M), name
    # The subnet the gateways trust for X-Forwarded-For is the one compose makes.
    subnet = compose()["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert f"GATEWAY_TRUSTED_PROXIES:-{subnet}" in (DEPLOY / "gateway.yaml").read_text()


def test_compose_gateway_config_loads() -> None:
    raw = yaml.safe_load((DEPLOY / "gateway.yaml").read_text())
    config = build_config(raw, env=ENV)
    assert config.storage.url == f"redis://:{ENV['REDIS_PASSWORD']}@redis:6379/0"
    assert config.server.workers == 2 and config.server.trusted_proxies


# -- the stack, brought up ---------------------------------------------------------


def podman_compose() -> str:
    found = shutil.which("podman-compose")
    if found is None:
        done = subprocess.run(
            ["sh", "-c", INSTALL_COMPOSE], capture_output=True, text=True, timeout=600
        )
        found = shutil.which("podman-compose")
        if done.returncode != 0 or found is None:
            pytest.fail(f"podman-compose is needed; `{INSTALL_COMPOSE}` failed:\n{done.stderr}")
    return found


def build_images(plan: Plan, directory: Path) -> None:
    """The gateway image as test_container.py builds it, and one image with
    Debian's redis-server and haproxy for the two other services."""
    build = [
        GATEWAY_IMAGE if arg.startswith("localhost/wx-gateway-test:") else arg for arg in plan.build
    ]
    _run(build, timeout=900, cwd=ROOT)
    (directory / "Containerfile").write_text(SIDECAR)
    sidecar = [SIDECAR_IMAGE if arg == GATEWAY_IMAGE else arg for arg in build[:-1]]
    _run([*sidecar, "-f", str(directory / "Containerfile"), str(directory)], timeout=900)


def run_args(plan: Plan) -> str:
    """What this machine's engine needs on every `run` (a runtime, ulimits), minus
    what compose decides itself (the network, removal)."""
    kept = [a for a in plan.run[2:] if a not in ("--rm", "--network=host", "--detach")]
    return " ".join(kept)


@dataclass(frozen=True)
class Stack:
    url: str


def compose_cmd(plan: Plan, override: Path) -> list[str]:
    return [
        podman_compose(),
        "-p", PROJECT,
        "-f", str(DEPLOY / "compose.yaml"),
        "-f", str(override),
        "--podman-run-args", run_args(plan),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    plan = _plan_or_skip()
    if plan.engine != "podman":
        pytest.fail(f"the compose test runs podman-compose; this machine's engine is {plan.engine}")
    directory = tmp_path_factory.mktemp("compose")
    build_images(plan, directory)
    # The demo upstream as a fourth service, from the gateway image.
    override = directory / "override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "upstream": {
                        "image": GATEWAY_IMAGE,
                        "command": [
                            "gateway",
                            "demo-upstream",
                            "--host",
                            "0.0.0.0",
                            "--port",
                            "9000",
                        ],
                    }
                }
            }
        )
    )
    port = free_port()
    env = {
        **os.environ,
        **ENV,
        "GATEWAY_IMAGE": GATEWAY_IMAGE,
        "REDIS_IMAGE": SIDECAR_IMAGE,
        "HAPROXY_IMAGE": SIDECAR_IMAGE,
        "PUBLISH": f"127.0.0.1:{port}",
    }
    cmd = compose_cmd(plan, override)
    try:
        _run([*cmd, "up", "-d"], timeout=300, env=env, cwd=DEPLOY)
        url = f"http://127.0.0.1:{port}"
        try:
            until_sync(lambda: all_up(url), "HAProxy sending to all three gateways", 180)
            until_sync(lambda: login(url)[0] == 200, "a login through the compose stack", 60)
            # And the upstream container (which nothing waits for) reached through each.
            token = login(url)[1]["token"]
            until_sync(
                lambda: all(call(url + "/api/up", token=token)[0] == 200 for _ in range(3)),
                "the upstream through every gateway",
                60,
            )
        except AssertionError as exc:
            logs = subprocess.run(
                [*cmd, "logs"], capture_output=True, text=True, env=env, cwd=DEPLOY
            )
            pytest.fail(f"{exc}\n{logs.stdout[-6000:]}{logs.stderr[-3000:]}")
        yield Stack(url)
    finally:
        _run([*cmd, "down", "-v"], timeout=300, check=False, env=env, cwd=DEPLOY)
        # podman-compose 1.0 leaves the project's network behind.
        _run([plan.engine, "network", "rm", "-f", f"{PROJECT}_default"], check=False)
        _run([plan.engine, "rmi", GATEWAY_IMAGE, SIDECAR_IMAGE], check=False)


def call(
    url: str, method: str = "GET", body: Any = None, token: str | None = None
) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), lowered(resp.headers.items())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), lowered(exc.headers.items())
    except OSError as exc:
        return 0, str(exc), {}


def all_up(base: str) -> bool:
    """Whether a few /readyz through the front reach every gateway: each came up
    and HAProxy's health check has it in (round robin over the UP ones)."""
    served = {call(base + "/readyz")[2].get("x-served-by") for _ in range(6)}
    return served == {"gw1", "gw2", "gw3"}


def lowered(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header names in lower case: HAProxy 2 sends them so, whatever they were."""
    return {name.lower(): value for name, value in headers}


def login(base: str, code: str = "compose-user") -> tuple[int, Any]:
    status, body, _ = call(base + "/auth/login", "POST", {"code": code})
    return status, body


def test_login_through_the_front_and_the_upstream_sees_x_openid(stack: Stack) -> None:
    status, session = login(stack.url)
    assert status == 200, session
    served_by = set()
    for _ in range(6):  # round robin: the token of one instance works on every one
        status, echoed, headers = call(stack.url + "/api/orders", token=session["token"])
        assert status == 200, echoed
        seen = {name.lower(): value for name, value in echoed["headers"].items()}
        assert seen["x-openid"] == session["openid"]
        assert "authorization" not in seen
        served_by.add(headers.get("x-served-by"))
    assert served_by == {"gw1", "gw2", "gw3"}


def test_a_logout_through_the_front_is_refused_by_every_instance(stack: Stack) -> None:
    status, session = login(stack.url, "compose-logout")
    assert status == 200, session
    status, _, _ = call(stack.url + "/auth/logout", "POST", token=session["token"])
    assert status == 200

    def refused_everywhere() -> bool:
        answers = [call(stack.url + "/api/x", token=session["token"]) for _ in range(3)]
        return all(status == 401 for status, _, _ in answers)

    until_sync(refused_everywhere, "every instance refusing the logged-out token")
