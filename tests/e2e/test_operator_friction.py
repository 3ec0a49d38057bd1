"""What a newcomer met first (issue 14): `gateway --version`, the application
log in JSON, `build/` left by `pip install .`, `./scripts/demo` started twice,
and the nginx sample of docs/deployment.md, which proxied /metrics to the world.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import gateway
from gateway.observability.logs import JsonFormatter
from tests.support.gateway import TOKEN_SECRET, free_port
from tests.support.nginx import nginx_binary
from tests.support.procs import ROOT, GatewayProcess, wait_healthy, write_config
from tests.support.waiting import until_sync

WECHAT_SECRET = "wechat-secret-for-log-format"
JSON_KEYS = {"time", "level", "logger", "pid", "message"}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ gateway\[\d+\] ")


# -- the version ---------------------------------------------------------------
def test_version_is_printed_from_its_one_source() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"gateway {gateway.__version__}\n"
    # pyproject.toml names no version of its own: the package metadata is built
    # from gateway.__version__, so the two cannot disagree.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("wx-gateway") == gateway.__version__


def test_pip_install_build_directory_is_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "build/" in ignored


# -- the application log's format ---------------------------------------------
def _run_two_workers(tmp_path: Path, log: dict[str, Any]) -> tuple[int, list[str]]:
    """Start a supervisor and two workers, wait until both workers listen, stop them."""
    port = free_port()
    raw = {
        "server": {"host": "127.0.0.1", "port": port, "workers": 2, "drain_delay": 0},
        "wechat": {"appid": "wxlogformat0000001", "secret": WECHAT_SECRET, "fake": True},
        "token": {"secret": TOKEN_SECRET},
        "storage": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "log": {"access": False, **log},
    }
    config = write_config(tmp_path / "config.yaml", raw)
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        until_sync(
            lambda: proc.poll() is not None or stderr.read_text().count("listening on") == 2,
            "two workers listening",
            timeout=60,
        )
        assert proc.poll() is None, stderr.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    output = stderr.read_text()
    assert TOKEN_SECRET not in output and WECHAT_SECRET not in output
    return proc.pid, [line for line in output.splitlines() if line.strip()]


def test_json_log_lines_from_the_supervisor_and_every_worker(tmp_path: Path) -> None:
    supervisor, lines = _run_two_workers(tmp_path, {"format": "json"})
    entries = [json.loads(line) for line in lines]  # every line: no text in between
    assert all(entry.keys() >= JSON_KEYS for entry in entries), lines
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries)
    pids = {entry["pid"] for entry in entries}
    assert supervisor in pids and len(pids) == 3, lines  # the supervisor and two workers
    assert any(
        e["level"] == "WARNING" and e["logger"] == "gateway" and "FAKE WeChat" in e["message"]
        for e in entries
    )


def test_text_stays_the_default(tmp_path: Path) -> None:
    _, lines = _run_two_workers(tmp_path, {})
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines


def test_a_json_line_carries_the_traceback_on_one_line() -> None:
    try:
        1 / 0  # noqa: B018 - the exception is the point
    except ZeroDivisionError:
        record = logging.getLogger("gateway.test").makeRecord(
            "gateway.test", logging.ERROR, __file__, 1, "failed: %s", ("why",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed: why" and entry["level"] == "ERROR"
    assert entry["logger"] == "gateway.test"
    assert entry["exc_info"].startswith("Traceback") and "ZeroDivisionError" in entry["exc_info"]
    plain = logging.makeLogRecord({"name": "gateway", "msg": "fine", "levelno": logging.INFO})
    assert "exc_info" not in json.loads(JsonFormatter().format(plain))


# -- ./scripts/demo ------------------------------------------------------------
def _checkout(tmp_path: Path) -> Path:
    """What ./scripts/demo needs of a clone, with a .venv that has every
    dependency already (from the environment running this test, by a .pth), so
    the only download is the editable build's setuptools."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("pyproject.toml", "setup.py", "build_backend.py", "README.md", "config.yaml"):
        shutil.copy2(ROOT / name, root / name)
    for name in ("gateway", "scripts"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "host-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return root


class Demo:
    """``./scripts/demo`` in its own process group, as in a terminal (Ctrl-C reaches all)."""

    def __init__(self, root: Path, run: int) -> None:
        self.port, self.upstream_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pip_log = root / f"pip-{run}.log"
        self.out = root / f"demo-{run}.out"
        env = {
            **os.environ,
            "GATEWAY_PORT": str(self.port),
            "DEMO_UPSTREAM_PORT": str(self.upstream_port),
            "PIP_LOG": str(self.pip_log),  # written only if pip runs
        }
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [root / "scripts" / "demo"],
                cwd=root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_serving(self) -> None:
        try:
            wait_healthy(self.url, self.proc, timeout=240)  # the first start installs
        except AssertionError as exc:
            raise AssertionError(f"{exc}; ./scripts/demo wrote: {self.out.read_text()}") from None

    def ctrl_c(self) -> str:
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(60)
        until_sync(lambda: not _accepts(self.upstream_port), "the demo upstream gone")
        return self.out.read_text()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:  # refused or reset: not accepted, whichever the kernel picks
        return False
    return True


def _post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def _readme_tour(url: str) -> dict[str, Any]:
    """The README's first curl commands: log in, then call /api/ with a forged X-OpenId."""
    login = _post_json(url + "/auth/login", {"code": "any-code-from-wx-login"})
    request = urllib.request.Request(
        url + "/api/orders",
        headers={"Authorization": f"Bearer {login['token']}", "X-OpenId": "forged"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        seen: dict[str, Any] = json.load(resp)
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(url + "/api/orders", timeout=10)
    anonymous.value.close()
    assert anonymous.value.code == 401
    assert seen["upstream"] == "demo" and seen["headers"]["X-OpenId"] == login["openid"]
    return seen


def test_demo_installs_once_and_keeps_its_upstream_out_of_the_log(tmp_path: Path) -> None:
    root = _checkout(tmp_path)

    first = Demo(root, 1)
    first.wait_serving()
    first.ctrl_c()
    assert first.pip_log.exists()  # a new .venv: installed

    second = Demo(root, 2)
    second.wait_serving()
    _readme_tour(second.url)
    output = second.ctrl_c()
    assert not second.pip_log.exists(), "pip ran again though pyproject.toml did not change"
    # One terminal: the upstream's own lines are marked, and it writes no
    # access log of its own between the gateway's JSON lines.
    assert any(line.startswith("demo-upstream: ") for line in output.splitlines())
    assert '"GET /api/orders HTTP/1.1"' not in output, output
    assert sum('"path":"/api/orders"' in line for line in output.splitlines()) == 2

    with (root / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# a changed dependency list would be here\n")
    third = Demo(root, 3)
    third.wait_serving()
    third.ctrl_c()
    assert third.pip_log.exists()  # pyproject.toml changed: installed again


# -- the nginx sample of docs/deployment.md -------------------------------------
DEPLOYMENT = ROOT / "docs" / "deployment.md"
DOC_LISTEN = "listen 443 ssl;"
DOC_GATEWAY = "proxy_pass http://127.0.0.1:8080;"
# Pieces of a path the gateway reads as /metrics in many spellings: it decodes
# %XX, drops a segment's ";params" and resolves "." and ".." (and ".;", "..;").
PIECES = ("metrics", "metrics;x", "%6detrics", "metrics%3bx", "x", ".", "..", "..;", ".;", "")


def _doc_nginx(port: int, gateway_url: str) -> str:
    """The first ```nginx block of docs/deployment.md, on a test port, without TLS."""
    match = re.search(r"^```nginx\n(.*?)^```", DEPLOYMENT.read_text(), re.S | re.M)
    assert match, "docs/deployment.md has no ```nginx block"
    block = match.group(1)
    for placeholder, value in (
        (DOC_LISTEN, f"listen 127.0.0.1:{port};"),
        (DOC_GATEWAY, f"proxy_pass {gateway_url};"),
    ):
        assert block.count(placeholder) == 1, f"the docs' nginx block lost {placeholder!r}"
        block = block.replace(placeholder, value)
    return "\n".join(line for line in block.splitlines() if "ssl_certificate" not in line)


def _nginx_conf(directory: Path, binary: str, server: str) -> str:
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stderr
    temp = [f"client_body_temp_path {directory}/body;", f"proxy_temp_path {directory}/proxy;"]
    temp += [
        f"{module}_temp_path {directory}/{module};"
        for module in ("fastcgi", "uwsgi", "scgi")
        if f"--without-http_{module}_module" not in built
    ]
    return "\n".join(
        [
            # As root, workers would run as nobody, who cannot enter pytest's tmp dirs.
            "user root;" if os.geteuid() == 0 else "",
            f"worker_processes 1; pid {directory}/nginx.pid;",
            f"error_log {directory}/error.log warn;",
            "events { worker_connections 64; }",
            "http {",
            "access_log off;",
            *temp,
            server,
            "}",
        ]
    )


def _get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _is_metrics(answer: tuple[int, bytes]) -> bool:
    return answer[0] == 200 and b"wxgateway_requests_total" in answer[1]


def test_the_documented_nginx_refuses_every_spelling_of_metrics(tmp_path: Path) -> None:
    port = free_port()
    raw = {
        "server": {"host": "127.0.0.1", "port": port, "trusted_proxies": ["127.0.0.1/32"]},
        "wechat": {"appid": "wxnginxmetrics0001", "secret": "wechat-secret-nginx", "fake": True},
        "token": {"secret": TOKEN_SECRET},
        "storage": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "log": {"access": False},
    }
    gw = GatewayProcess(["run", "-c", str(write_config(tmp_path / "config.yaml", raw))])
    edge_port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        _nginx_conf(tmp_path, nginx_binary(), _doc_nginx(edge_port, f"http://127.0.0.1:{port}"))
    )
    nginx = subprocess.Popen(
        [
            nginx_binary(),
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", gw.proc)
        until_sync(lambda: nginx.poll() is not None or _accepts(edge_port), "nginx listening")
        assert nginx.poll() is None, (tmp_path / "error.log").read_text()
        assert _get(edge_port, "/healthz")[0] == 200  # nginx does forward to the gateway
        spellings = [
            "/" + "/".join(parts)
            for length in (1, 2, 3)
            for parts in itertools.product(PIECES, repeat=length)
        ]
        # Every spelling the gateway itself answers as /metrics ...
        reaching = [path for path in spellings if _is_metrics(_get(port, path))]
        assert {"/metrics", "/metrics;x", "/x/..;/metrics", "/.;/metrics"} <= set(reaching)
        # ... is refused by the documented nginx in front of it.
        leaks = [path for path in reaching if _get(edge_port, path)[0] != 404]
        assert leaks == []
    finally:
        nginx.terminate()
        nginx.wait(30)
        gw.stop()
