"""The container image, built and run for real (Dockerfile, docs/deployment-container.md).

Where the image comes from, in order:

1. ``../shared/tools/container-base.sh`` beside the repository (this project's
   development and CI machines, which reach no image registry): it installs podman
   and runc, imports a local Debian base image, and prints the build and run commands
   that work there; this module uses them. The first run on a machine includes a
   debootstrap and takes minutes; later runs reuse the base image and the build cache.
2. Otherwise, any podman or docker that answers ``info``, with the Dockerfile's own
   base image (``python:3.12-slim``): already present, or pulled from its registry.

When neither works (no container engine, or no base image: no registry reachable and
no helper), every test here is skipped with one line saying what is missing
(``scripts/test`` shows skip reasons: ``-rfEs``). **Except in CI**: when the environment variable
``CI`` is set (to anything but ``""``, ``0`` or ``false``; CI sets ``CI=true``, and
``.ci/run`` sets it too), the same situation fails the tests instead, naming what is
missing, since CI has podman and the helper and must skip nothing. Once an engine and
a base image are there, every problem fails: nothing past that point skips.

The engine must run on this machine (Linux): the tests reach the container over
``--network=host`` and read its process from the host's ``/proc``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
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
from tests.support import ROOT
from tests.support.gateway import free_port
from tests.support.waiting import until_sync

# Cold, the first test also pays for apt, debootstrap (or a pull) and the image build.
pytestmark = pytest.mark.timeout(900)

BASE_SCRIPT = ROOT.parent / "shared" / "tools" / "container-base.sh"
ENGINES = ("podman", "docker")
# Tagged per test run, so that two runs at once (two clones, one machine) never
# inspect each other's image; the tag is removed at the end.
IMAGE = f"localhost/wx-gateway-test:{os.getpid()}"
CONTAINER = f"wx-gateway-test-{os.getpid()}"
LOGIN_CODE = "container-test-code"


class Unavailable(Exception):
    """No container engine or no base image on this machine: a skip, or a failure in CI."""


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def _cause(text: str) -> str:
    """The root cause in an engine's error output, short enough for a summary line:
    its last line, and of a Go-style "a: b: c: d" chain only the last two links."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no output"
    return ": ".join(lines[-1].split(": ")[-2:])[:200]


def _run(cmd: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> str:
    """Run ``cmd``; on failure, fail the test with its output (never skip)."""
    try:
        done: subprocess.CompletedProcess[str] = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, **kw
        )
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


def _probe(cmd: list[str], timeout: float) -> str | None:
    """Run ``cmd`` to learn what this machine has: None if it worked, else why not."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return "not installed"
    except subprocess.TimeoutExpired:
        return f"`{shlex.join(cmd)}` took longer than {timeout:.0f}s"
    return None if done.returncode == 0 else _cause(done.stderr or done.stdout)


@dataclass(frozen=True)
class Plan:
    """How this machine builds and runs the image."""

    engine: str
    build: list[str]  # a whole command; the context is ROOT
    run: list[str]  # up to (not including) the image name


def _printed_command(output: str, label: str) -> list[str]:
    for line in output.splitlines():
        if line.startswith(f"{label}:"):
            return shlex.split(line.split(":", 1)[1])
    pytest.fail(f"{BASE_SCRIPT} printed no '{label}:' line:\n{output}")


def _named(cmd: list[str]) -> list[str]:
    return [IMAGE if arg == "localhost/NAME" else arg for arg in cmd]


def _plan_from_helper() -> Plan:
    output = _run(["bash", str(BASE_SCRIPT)], timeout=600)
    build = _named(_printed_command(output, "build"))
    # HEALTHCHECK exists only in the Docker image format; podman's default (OCI)
    # drops it with a warning.
    build[-1:-1] = ["--format", "docker"]
    run = _named(_printed_command(output, "run"))
    assert run[-1] == IMAGE, run
    # Detached, and removed by the fixture's finally rather than by --rm, so that the
    # logs of a container that died early can still be read.
    return Plan(engine=build[0], build=build, run=[arg for arg in run[:-1] if arg != "--rm"])


def _working_engine() -> str:
    """The first engine that answers ``info`` (a docker CLI without its daemon does not)."""
    why_not = {}
    for engine in ENGINES:
        problem = _probe([engine, "info"], timeout=60)
        if problem is None:
            return engine
        why_not[engine] = problem
    found = "; ".join(f"{engine}: {problem}" for engine, problem in why_not.items())
    raise Unavailable(f"no working container engine ({found})")


def _dockerfile_base() -> str:
    match = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile has no FROM line"
    return match.group(1)


def _qualified(image: str) -> str:
    """``python:3.12-slim`` as ``docker.io/library/python:3.12-slim``: podman asks no
    short-name question (which fails without a terminal) of a full name."""
    first, _, rest = image.partition("/")
    if not rest:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def _ensure_base(engine: str, base: str) -> None:
    if _probe([engine, "image", "inspect", base], timeout=60) is None:
        return
    problem = _probe([engine, "pull", base], timeout=600)
    if problem is not None:
        raise Unavailable(f"{engine} cannot pull {base} ({problem})")


def _plan_from_engine() -> Plan:
    engine = _working_engine()
    base = _qualified(_dockerfile_base())
    _ensure_base(engine, base)
    build = [engine, "build", "-t", IMAGE]
    if engine == "podman":
        # The Docker format keeps HEALTHCHECK (see above); --from names the base just
        # pulled, however this podman resolves short names.
        build += ["--format", "docker", "--from", base]
    return Plan(engine=engine, build=[*build, "."], run=[engine, "run", "--network=host"])


def _plan() -> Plan:
    if BASE_SCRIPT.is_file():
        return _plan_from_helper()
    try:
        return _plan_from_engine()
    except Unavailable as exc:
        raise Unavailable(f"{exc}, and {BASE_SCRIPT} is absent") from None


def _plan_or_skip() -> Plan:
    try:
        return _plan()
    except Unavailable as exc:
        reason = str(exc)
    # Outside the except block, so that the report is this one line, not a chain.
    if _in_ci():
        pytest.fail(f"CI is set, so the container tests may not skip: {reason}")
    pytest.skip(f"no container image can be built here: {reason}")


@dataclass(frozen=True)
class Built:
    engine: str
    run_cmd: list[str]  # up to (not including) the image name
    size: int


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    started = time.monotonic()
    plan = _plan_or_skip()
    prepared = time.monotonic()
    _run(plan.build, timeout=600, cwd=ROOT)
    try:
        finished = time.monotonic()
        size = int(_run([plan.engine, "image", "inspect", "--format", "{{.Size}}", IMAGE]).strip())
        print(
            f"\n[container] {plan.engine}: base ready in {prepared - started:.0f}s, image built "
            f"in {finished - prepared:.0f}s; {size / 1e6:.1f} MB ({size} bytes)"
        )
        yield Built(engine=plan.engine, run_cmd=plan.run, size=size)
    finally:
        # This run's tag (and the image, unless another tag holds it).
        _run([plan.engine, "rmi", IMAGE], check=False)


@dataclass(frozen=True)
class Running:
    engine: str
    url: str
    upstream_port: int


def _state(engine: str, name: str) -> dict[str, Any]:
    out = _run([engine, "inspect", "--type", "container", name])
    state: dict[str, Any] = json.loads(out)[0]["State"]
    return state


def _logs(engine: str, name: str) -> str:
    # The gateway logs to stderr, which `logs` replays on its own stderr.
    done = subprocess.run([engine, "logs", name], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def _wait_upstream(port: int, proc: subprocess.Popen[bytes]) -> None:
    url = f"http://127.0.0.1:{port}/"
    until_sync(lambda: proc.poll() is not None or _answers(url), f"the demo upstream at {url}")
    if proc.poll() is not None:
        pytest.fail(f"the demo upstream exited: {proc.communicate()[1].decode()}")


def _wait_healthy(engine: str, url: str, name: str) -> None:
    def settled() -> bool:
        return not _state(engine, name)["Running"] or _answers(url + "/healthz")

    try:
        until_sync(settled, "the gateway in the container answering /healthz", timeout=60)
    except AssertionError as exc:
        pytest.fail(f"{exc}\n{_logs(engine, name)}")
    if not _state(engine, name)["Running"]:
        pytest.fail(f"the container exited: {_state(engine, name)}\n{_logs(engine, name)}")


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
        _wait_healthy(built.engine, url, CONTAINER)
        yield Running(engine=built.engine, url=url, upstream_port=upstream_port)
    finally:
        # --volumes: also the anonymous volume that VOLUME made for the database.
        _run([built.engine, "rm", "--force", "--volumes", CONTAINER], check=False)
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


def _image_config(engine: str) -> dict[str, Any]:
    image: dict[str, Any] = json.loads(_run([engine, "image", "inspect", IMAGE]))[0]
    return image


def _healthcheck(image: dict[str, Any]) -> Any:
    # podman reports it beside Config, docker inside it.
    return image.get("Healthcheck") or image["Config"].get("Healthcheck")


def test_image_declares_user_port_healthcheck_and_defaults(built: Built) -> None:
    image = _image_config(built.engine)
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert "8080/tcp" in config["ExposedPorts"]
    assert "/var/lib/wx-gateway" in config["Volumes"]
    assert config["Cmd"] == ["gateway", "run", "-c", "/etc/wx-gateway/config.yaml"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert env["GATEWAY_PORT"] == "8080"
    assert env["GATEWAY_STORAGE_URL"] == "sqlite:////var/lib/wx-gateway/gateway.db"
    check = _healthcheck(image)
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
    listing = _run([running.engine, "exec", CONTAINER, "ls", "-ln", "/var/lib/wx-gateway"])
    assert "gateway.db" in listing, listing
    db_line = next(line for line in listing.splitlines() if line.endswith(" gateway.db"))
    assert db_line.split()[2:4] == ["10001", "10001"], db_line


def _as_seen_inside(pid: int, host_uid: int) -> int:
    """A uid of process ``pid`` as its user namespace sees it: a rootless engine maps
    the container's 10001 to some uid of its own on the host (/proc/PID/uid_map)."""
    for line in Path(f"/proc/{pid}/uid_map").read_text().splitlines():
        inside, outside, count = (int(field) for field in line.split())
        if outside <= host_uid < outside + count:
            return inside + host_uid - outside
    raise AssertionError(f"uid {host_uid} of pid {pid} is not mapped into its namespace")


def test_gateway_process_is_not_root(running: Running) -> None:
    assert _run([running.engine, "exec", CONTAINER, "id", "-u"]).strip() == "10001"
    # The server process itself, seen from the host: real, effective, saved and fs uids.
    pid = _state(running.engine, CONTAINER)["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert [_as_seen_inside(pid, int(uid)) for uid in uids] == [10001] * 4, status
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"run" in cmdline and b"/etc/wx-gateway/config.yaml" in cmdline, cmdline


def test_healthcheck_command_passes(running: Running) -> None:
    # The image's HEALTHCHECK command, run inside the container as the engine would:
    # the same for podman and docker (docker has no `healthcheck run`, and waits
    # --interval before its first check). A failing check exits non-zero.
    test = _healthcheck(_image_config(running.engine))["Test"]
    assert test[0] == "CMD", test
    _run([running.engine, "exec", CONTAINER, *test[1:]], timeout=60)


def test_no_compiler_installer_or_pip_cache_in_the_image(running: Running) -> None:
    probe = (
        "for tool in gcc cc make; do command -v $tool; done; "
        "for path in /opt/venv/bin/pip /root/.cache/pip /var/lib/wx-gateway/.cache /src; do "
        "test -e $path && echo $path; done; true"
    )
    exec_in = [running.engine, "exec"]
    found = _run([*exec_in, "--user", "0", CONTAINER, "sh", "-c", probe])
    assert found == "", f"found in the image: {found}"
    # Installed into the venv as a regular package, not pointing at a source tree.
    where = _run([*exec_in, CONTAINER, "python3", "-c", "import gateway; print(gateway.__file__)"])
    assert where.startswith("/opt/venv/lib/") and "site-packages/gateway/" in where, where
    checked = _run([*exec_in, CONTAINER, "gateway", "check", "-c", "/etc/wx-gateway/config.yaml"])
    assert "OK" in checked, checked


def test_stops_by_itself_on_sigterm(running: Running) -> None:
    # Last in the module. The gateway is PID 1, which the kernel shields from any
    # signal it has no handler for: only its own SIGTERM handling ends it with 0.
    # One that ignored SIGTERM would be killed after the 20 s grace, exit code 137.
    # -t: podman spells it --time, docker --timeout.
    _run([running.engine, "stop", "-t", "20", CONTAINER], timeout=60)
    state = _state(running.engine, CONTAINER)
    assert state["ExitCode"] == 0, state


def test_engine_choice_without_helper_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the helper and without any engine on PATH, the reason names both."""
    monkeypatch.setattr(sys.modules[__name__], "BASE_SCRIPT", tmp_path / "absent.sh")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("podman") is None and shutil.which("docker") is None
    with pytest.raises(Unavailable) as caught:
        _plan()
    reason = str(caught.value)
    assert "podman: not installed" in reason and "docker: not installed" in reason, reason
    assert str(tmp_path / "absent.sh") in reason and "\n" not in reason, reason
