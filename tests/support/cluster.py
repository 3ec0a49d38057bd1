"""Several gateways as one, the way an operator runs them (issue 16): a real
``redis-server`` with AOF on, N ``gateway run`` instances (separate processes,
separate ports, ``workers`` each) sharing it, the fake WeChat and the demo
upstream as servers of their own, and a real HAProxy round-robin in front that
health-checks ``/readyz``. All on loopback, all real processes; used by
tests/e2e/test_cluster.py and bench/cluster.py.

Each instance runs in a session of its own (``start_new_session``), so
``kill9()`` takes the supervisor and its workers at once, as a crashed host or
container would: killing only the supervisor would leave its workers serving
for up to a second (they watch their parent), which is not a dead instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from tests.support import ROOT
from tests.support.gateway import TOKEN_SECRET, free_port
from tests.support.redis import RedisServer
from tests.support.waiting import PROMPT, until_sync

APPID = "wxcluster00000001"
WECHAT_SECRET = "cluster-wechat-secret"  # the fake WeChat checks it (--app APPID:SECRET)
PREFIX = "wxgw-cluster:"
REDIS_PASSWORD = "cluster-redis-password"  # printed as *** in every gateway message
INSTALL_HAPROXY = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy"

# The shipped HAProxy config (deploy/haproxy/haproxy.cfg) is the one tested:
# only where it listens and where the instances are change, and a stats socket
# is added for the tests to read the health checks' view.
DEPLOY_HAPROXY = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_config(directory: Path, port: int, backends: dict[str, int]) -> str:
    text = DEPLOY_HAPROXY.read_text()
    edits = [
        (
            r"(?m)^global\n",
            f"global\n    stats socket {directory}/haproxy.sock mode 600 level admin\n",
        ),
        (r"(?m)^    bind :8080$", f"    bind 127.0.0.1:{port}"),
    ]
    for name, backend_port in backends.items():
        edits.append(
            (
                rf"(?m)^    server {name} {name}:8080 ",
                f"    server {name} 127.0.0.1:{backend_port} ",
            )
        )
    for pattern, replacement in edits:
        text, found = re.subn(pattern, replacement, text)
        # A shipped file that changed shape must fail here, not run half-edited.
        assert found == 1, f"{DEPLOY_HAPROXY}: no single match for {pattern!r}"
    return text


def haproxy_binary() -> str:
    """HAProxy from Debian's packages, installed if missing: fail, never skip."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if found is None:
        done = subprocess.run(
            ["sh", "-c", INSTALL_HAPROXY], capture_output=True, text=True, timeout=600, check=False
        )
        found = shutil.which("haproxy", path="/usr/sbin:/usr/bin")
        if done.returncode != 0 or found is None:
            raise AssertionError(
                f"haproxy is needed and `{INSTALL_HAPROXY}` failed ({done.returncode}):\n"
                + done.stdout[-2000:]
                + done.stderr[-2000:]
            )
    return found


def answers_http(url: str) -> bool:
    """Any HTTP answer at ``url`` (an error status too): the server is up."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


class Service:
    """A long-lived subprocess with its output in a file (a pipe nobody reads
    would stall it), in a session of its own."""

    def __init__(self, name: str, argv: list[str], directory: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self._out = open(self.log, "ab")  # noqa: SIM115 - closed by stop()/kill9()
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, stdout=self._out, stderr=self._out, start_new_session=True
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, url: str) -> None:
        def settled() -> bool:
            return not self.running or answers_http(url)

        until_sync(settled, f"{self.name} answering {url}", timeout=3 * PROMPT, every=0.1)
        assert self.running, f"{self.name} exited ({self._returncode()}):\n{self.output()}"

    def stop(self) -> None:
        """SIGTERM to the main process (a gateway's supervisor passes it on), then
        whatever of the session is left is killed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(PROMPT)
            except subprocess.TimeoutExpired:
                self._kill_session()
        self._close()

    def kill9(self) -> None:
        """SIGKILL to every process of the session at once: a crash, no goodbye."""
        assert self.proc is not None
        self._kill_session()
        self._close()

    def _kill_session(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass(frozen=True)
class Settings:
    """What the instances are configured with (the rest: ``instance_config``)."""

    instances: int = 3
    workers: int = 2
    login_per_ip: str | int = 0
    route_rate: str | None = None  # the /limited/ route's rate_limit; None: no such route


def instance_config(
    settings: Settings, port: int, redis_url: str, wechat_port: int, upstream_port: int
) -> dict[str, Any]:
    upstream = f"http://127.0.0.1:{upstream_port}"
    routes: list[dict[str, Any]] = [{"prefix": "/api/", "upstream": upstream, "auth": "required"}]
    if settings.route_rate is not None:
        routes.append(
            {
                "prefix": "/limited/",
                "upstream": upstream,
                "auth": "required",
                "rate_limit": settings.route_rate,
            }
        )
    return {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "workers": settings.workers,
            # HAProxy connects from here; the client is its X-Forwarded-For.
            "trusted_proxies": ["127.0.0.1/32"],
            "shutdown_grace": "2s",
            "drain_delay": 0,
        },
        "wechat": {
            "appid": APPID,
            "secret": WECHAT_SECRET,
            "api_base": f"http://127.0.0.1:{wechat_port}",
            "timeout": "2s",
            "fake": False,  # the real client, against the fake WeChat's server: calls are counted
        },
        "token": {"secret": TOKEN_SECRET},
        "storage": {"url": redis_url, "prefix": PREFIX},
        "rate_limits": {"login_per_ip": settings.login_per_ip},
        "log": {"access": False},
        "routes": routes,
    }


class HAProxy(Service):
    def __init__(self, directory: Path, backends: dict[str, int]) -> None:
        self.port = free_port()
        self.directory = directory
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(directory, self.port, backends))
        # -db: stay in the foreground, so that stop() and the session kill reach it.
        super().__init__("haproxy", [haproxy_binary(), "-db", "-f", str(self.config)], directory)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def statuses(self) -> dict[str, str]:
        """Each backend server's state as the health checks see it (UP, DOWN, ...),
        read from the stats socket."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.directory / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        header, *rows = data.decode().lstrip("# ").splitlines()
        columns = header.split(",")
        found = {}
        for row in rows:
            values = dict(zip(columns, row.split(","), strict=False))
            if values.get("pxname") == "gateways" and values["svname"] != "BACKEND":
                found[values["svname"]] = values["status"].split()[0]
        return found

    def wait_status(self, want: dict[str, str], timeout: float = PROMPT) -> None:
        until_sync(lambda: self._matches(want), f"HAProxy sees {want}", timeout=timeout)

    def _matches(self, want: dict[str, str]) -> bool:
        try:
            statuses = self.statuses()
        except OSError:  # not listening on its socket yet
            return False
        return all(statuses.get(name) == status for name, status in want.items())


@dataclass
class Instance:
    name: str
    port: int
    service: Service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.service.start()
        self.service.wait_for(self.url + "/healthz")


@dataclass
class Cluster:
    directory: Path
    settings: Settings
    redis: RedisServer
    wechat: Service
    wechat_port: int
    upstream: Service
    instances: list[Instance] = field(default_factory=list)
    haproxy: HAProxy | None = None

    @property
    def front(self) -> HAProxy:
        assert self.haproxy is not None
        return self.haproxy

    def instance(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    def fake_stats(self) -> dict[str, Any]:
        """What the fake WeChat counted: ``calls`` per API (stable_token, ...)."""
        url = f"http://127.0.0.1:{self.wechat_port}/_fake/stats"
        with urllib.request.urlopen(url, timeout=5) as resp:
            stats: dict[str, Any] = json.loads(resp.read())
            return stats

    def gateway_logs(self) -> str:
        """What the gateway instances wrote (every start of each, kill -9s included)."""
        return "\n".join(i.service.output() for i in self.instances)

    def logs(self) -> str:
        """Every process's output, for a failure message."""
        services = [self.wechat, self.upstream, *(i.service for i in self.instances)]
        if self.haproxy is not None:
            services.append(self.haproxy)
        return "\n".join(f"--- {s.name}\n{s.output()[-3000:]}" for s in services)


def gateway_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


@contextlib.contextmanager
def running_cluster(directory: Path, settings: Settings) -> Iterator[Cluster]:
    """The whole cluster, started; everything stopped on the way out."""
    redis = RedisServer(directory / "redis", password=REDIS_PASSWORD, aof=True).start()
    wechat_port, upstream_port = free_port(), free_port()
    cluster = Cluster(
        directory,
        settings,
        redis,
        Service(
            "fake-wechat",
            gateway_argv(
                "fake-wechat", "--port", str(wechat_port), "--app", f"{APPID}:{WECHAT_SECRET}"
            ),
            directory,
        ),
        wechat_port,
        Service("upstream", gateway_argv("demo-upstream", "--port", str(upstream_port)), directory),
    )
    try:
        cluster.wechat.start()
        cluster.upstream.start()
        for n in range(1, settings.instances + 1):
            port = free_port()
            path = directory / f"gw{n}.yaml"
            raw = instance_config(settings, port, redis.url, wechat_port, upstream_port)
            path.write_text(yaml.safe_dump(raw))
            service = Service(f"gw{n}", gateway_argv("run", "-c", str(path)), directory)
            cluster.instances.append(Instance(f"gw{n}", port, service))
        # Started together, waited for in turn: the slow part is each one's imports.
        for instance in cluster.instances:
            instance.service.start()
        cluster.wechat.wait_for(f"http://127.0.0.1:{wechat_port}/_fake/stats")
        cluster.upstream.wait_for(f"http://127.0.0.1:{upstream_port}/")
        for instance in cluster.instances:
            instance.service.wait_for(instance.url + "/healthz")
        cluster.haproxy = HAProxy(directory, {i.name: i.port for i in cluster.instances})
        cluster.haproxy.start()
        cluster.haproxy.wait_status({i.name: "UP" for i in cluster.instances})
        yield cluster
    finally:
        if cluster.haproxy is not None:
            cluster.haproxy.stop()
        for instance in cluster.instances:
            instance.service.stop()
        cluster.upstream.stop()
        cluster.wechat.stop()
        redis.stop()
