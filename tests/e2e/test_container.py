"""The container image, built and run for real (Dockerfile, docs/deployment-container.md).

No image registry is reachable on these machines, so ``shared/tools/container-base.sh``
(beside the repository) installs podman and runc and makes a local Debian base image;
it prints the build and run commands that work here, and this module uses them. The
first run on a machine includes a debootstrap and takes minutes; later runs reuse the
base image and the build cache. Nothing here skips: if podman cannot work, the
module fails and says why.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.wechat import fake
from tests.conftest import free_port
from tests.support.procs import ROOT

# Cold, the first test also pays for apt, debootstrap and the image build.
pytestmark = pytest.mark.timeout(900)

BASE_SCRIPT = ROOT.parent / "shared" / "tools" / "container-base.sh"
IMAGE = "localhost/wx-gateway"
CONTAINER = f"wx-gateway-test-{os.getpid()}"
LOGIN_CODE = "container-test-code"


def _run(cmd: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> str:
    """Run ``cmd``; on failure, fail the test with its output (never skip)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError as exc:
        pytest.fail(f"cannot run {cmd[0]}: {exc}")
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{shlex.join(cmd)} took longer than {timeout}s: {exc.stderr!r}")
    if check and done.returncode != 0:
        pytest.fail(
            f"{shlex.join(cmd)} exited {done.returncode}\n"
            f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )
    return done.stdout


def _printed_command(output: str, label: str) -> list[str]:
    for line in output.splitlines():
        if line.startswith(f"{label}:"):
            return shlex.split(line.split(":", 1)[1])
    pytest.fail(f"{BASE_SCRIPT} printed no '{label}:' line:\n{output}")


def _named(cmd: list[str]) -> list[str]:
    return [IMAGE if arg == "localhost/NAME" else arg for arg in cmd]


@dataclass(frozen=True)
class Built:
    run_cmd: list[str]  # the script's run command, up to (not including) the image name
    size: int


@pytest.fixture(scope="module")
def built() -> Built:
    if not BASE_SCRIPT.is_file():
        pytest.fail(
            f"{BASE_SCRIPT} is missing: the container test needs shared/tools beside the "
            "repository (a clean clone has it at <repo>/../shared/tools/container-base.sh)"
        )
    started = time.monotonic()
    output = _run(["bash", str(BASE_SCRIPT)], timeout=600)
    prepared = time.monotonic()
    build = _named(_printed_command(output, "build"))
    # HEALTHCHECK exists only in the Docker image format; podman's default (OCI)
    # drops it with a warning.
    build[-1:-1] = ["--format", "docker"]
    _run(build, timeout=600, cwd=ROOT)
    finished = time.monotonic()
    size = int(_run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE]).strip())
    print(
        f"\n[container] base ready in {prepared - started:.0f}s, image built in "
        f"{finished - prepared:.0f}s; {IMAGE} is {size / 1e6:.1f} MB ({size} bytes)"
    )
    run = _named(_printed_command(output, "run"))
    assert run[-1] == IMAGE, run
    # Detached, and removed by the fixture's finally rather than by --rm, so that the
    # logs of a container that died early can still be read.
    return Built(run_cmd=[arg for arg in run[:-1] if arg != "--rm"], size=size)


@dataclass(frozen=True)
class Running:
    url: str
    upstream_port: int


def _state(name: str) -> dict[str, Any]:
    out = _run(["podman", "inspect", "--type", "container", name])
    state: dict[str, Any] = json.loads(out)[0]["State"]
    return state


def _logs(name: str) -> str:
    # The gateway logs to stderr, which `podman logs` replays on its own stderr.
    done = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def _wait_upstream(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo upstream exited: {proc.communicate()[1].decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"the demo upstream did not answer on port {port} in {timeout}s")


def _wait_healthy(url: str, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _state(name)["Running"]:
            pytest.fail(f"the container exited: {_state(name)}\n{_logs(name)}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(
        f"the gateway in the container did not answer /healthz in {timeout}s\n{_logs(name)}"
    )


@pytest.fixture(scope="module")
def running(built: Built) -> Iterator[Running]:
    upstream_port, gateway_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo-upstream", "--port", str(upstream_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_upstream(upstream_port, upstream)
        env = {
            "GATEWAY_PORT": str(gateway_port),
            "DEMO_UPSTREAM": f"http://127.0.0.1:{upstream_port}",
            "WECHAT_FAKE": "true",
        }
        flags = [f"--env={name}={value}" for name, value in env.items()]
        _run([*built.run_cmd, "--detach", f"--name={CONTAINER}", *flags, IMAGE], timeout=120)
        url = f"http://127.0.0.1:{gateway_port}"
        _wait_healthy(url, CONTAINER)
        yield Running(url=url, upstream_port=upstream_port)
    finally:
        # --volumes: also the anonymous volume that VOLUME made for the database.
        _run(["podman", "rm", "--force", "--volumes", "--time=5", CONTAINER], check=False)
        upstream.terminate()
        upstream.wait(10)
        assert upstream.stderr is not None
        upstream.stderr.close()


def _call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _image_config() -> dict[str, Any]:
    image: dict[str, Any] = json.loads(_run(["podman", "image", "inspect", IMAGE]))[0]
    return image


def test_image_declares_user_port_healthcheck_and_defaults(built: Built) -> None:
    image = _image_config()
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert "8080/tcp" in config["ExposedPorts"]
    assert "/var/lib/wx-gateway" in config["Volumes"]
    assert config["Cmd"] == ["gateway", "run", "-c", "/etc/wx-gateway/config.yaml"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert env["GATEWAY_PORT"] == "8080"
    assert env["GATEWAY_STORAGE_URL"] == "sqlite:////var/lib/wx-gateway/gateway.db"
    check = image.get("Healthcheck")
    assert check, f"no HEALTHCHECK in the image: {sorted(image)} / {sorted(config)}"
    assert check["Test"][0] == "CMD"
    assert "/healthz" in " ".join(check["Test"])
    print(f"\n[container] image size {built.size / 1e6:.1f} MB")


def test_login_and_proxy_through_the_container(running: Running) -> None:
    status, login = _call(f"{running.url}/auth/login", "POST", {"code": LOGIN_CODE})
    assert status == 200, login
    assert login["openid"] == fake.openid_for(LOGIN_CODE)
    status, echoed = _call(
        f"{running.url}/api/orders",
        headers={"Authorization": f"Bearer {login['token']}", "X-OpenId": "forged"},
    )
    assert status == 200, echoed
    assert echoed["upstream"] == "demo"
    assert echoed["path"] == "/api/orders"
    seen = {name.lower(): value for name, value in echoed["headers"].items()}
    assert seen["x-openid"] == login["openid"]
    assert "authorization" not in seen
    status, refused = _call(f"{running.url}/api/orders")
    assert (status, refused["error"]) == (401, "token_missing")


def test_storage_is_the_writable_volume(running: Running) -> None:
    status, ready = _call(f"{running.url}/readyz")
    assert status == 200, ready
    # The login above created the user row; the database is where the image says.
    listing = _run(["podman", "exec", CONTAINER, "ls", "-ln", "/var/lib/wx-gateway"])
    assert "gateway.db" in listing, listing
    db_line = next(line for line in listing.splitlines() if line.endswith(" gateway.db"))
    assert db_line.split()[2:4] == ["10001", "10001"], db_line


def test_gateway_process_is_not_root(running: Running) -> None:
    assert _run(["podman", "exec", CONTAINER, "id", "-u"]).strip() == "10001"
    # The server process itself, seen from the host: real, effective, saved and fs uids.
    pid = _state(CONTAINER)["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == ["10001"] * 4, status
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"run" in cmdline and b"/etc/wx-gateway/config.yaml" in cmdline, cmdline


def test_healthcheck_command_passes(running: Running) -> None:
    # Runs the image's HEALTHCHECK command inside the container, as the engine would.
    out = _run(["podman", "healthcheck", "run", CONTAINER], timeout=60)
    assert "unhealthy" not in out, out


def test_no_compiler_installer_or_pip_cache_in_the_image(running: Running) -> None:
    probe = (
        "for tool in gcc cc make; do command -v $tool; done; "
        "for path in /opt/venv/bin/pip /root/.cache/pip /var/lib/wx-gateway/.cache /src; do "
        "test -e $path && echo $path; done; true"
    )
    found = _run(["podman", "exec", "--user", "0", CONTAINER, "sh", "-c", probe])
    assert found == "", f"found in the image: {found}"
    # Installed into the venv as a regular package, not pointing at a source tree.
    where = _run(
        ["podman", "exec", CONTAINER, "python3", "-c", "import gateway; print(gateway.__file__)"]
    )
    assert where.startswith("/opt/venv/lib/") and "site-packages/gateway/" in where, where
    checked = _run(
        ["podman", "exec", CONTAINER, "gateway", "check", "-c", "/etc/wx-gateway/config.yaml"]
    )
    assert "OK" in checked, checked


def test_stops_promptly_on_sigterm(running: Running) -> None:
    # Last in the module: the gateway is PID 1 and must act on SIGTERM itself;
    # a process that ignored it would be killed after the 20 s grace.
    started = time.monotonic()
    _run(["podman", "stop", "--time=20", CONTAINER], timeout=60)
    elapsed = time.monotonic() - started
    state = _state(CONTAINER)
    assert state["ExitCode"] == 0, state
    assert elapsed < 15, f"podman stop took {elapsed:.1f}s"
