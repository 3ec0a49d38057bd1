"""A real nginx in front of the gateway, run from a test's own directory with a
server block taken from the docs (so the docs' config is what is tested)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.waiting import PROMPT

INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light"


def find_nginx() -> str | None:
    if found := shutil.which("nginx"):
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_binary() -> str:
    """nginx from Debian's packages, installed if missing: fail, never skip."""
    found = find_nginx()
    if found is None:
        result = subprocess.run(
            ["sh", "-c", INSTALL], capture_output=True, text=True, timeout=600, check=False
        )
        found = find_nginx()
        if result.returncode != 0 or found is None:
            pytest.fail(
                f"nginx is needed and `{INSTALL}` failed ({result.returncode}):\n"
                + result.stdout[-2000:]
                + result.stderr[-2000:]
            )
    return found


def doc_block(doc: Path) -> str:
    """The first ```nginx block of ``doc``: the config the docs promise."""
    match = re.search(r"^```nginx\n(.*?)^```", doc.read_text(), re.S | re.M)
    assert match, f"{doc.name} has no ```nginx block"
    return match.group(1)


def built_with(binary: str) -> str:
    """`nginx -V`: how this nginx was configured (which modules it has)."""
    return subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stderr


def http_conf(directory: Path, binary: str, server: str) -> str:
    """A whole nginx.conf around ``server``: everything nginx writes goes to
    ``directory``."""
    built = built_with(binary)
    temp = [
        f"client_body_temp_path {directory}/client_body;",
        f"proxy_temp_path {directory}/proxy;",
    ]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in built:
            temp.append(f"{module}_temp_path {directory}/{module};")
    lines = [
        # As root the workers would otherwise run as nobody, who cannot enter pytest's tmp dirs.
        "user root;" if os.geteuid() == 0 else "",
        "worker_processes 1;",
        f"pid {directory}/nginx.pid;",
        f"error_log {directory}/error.log warn;",
        "events { worker_connections 64; }",
        "http {",
        "    access_log off;",
        *(f"    {line}" for line in temp),
        server,
        "}",
    ]
    return "\n".join(lines) + "\n"


class Nginx:
    """nginx running ``conf`` in the foreground, its logs in ``directory``."""

    def __init__(self, binary: str, directory: Path, conf: str) -> None:
        self.directory = directory
        path = directory / "nginx.conf"
        path.write_text(conf)
        with open(directory / "stderr", "wb") as stderr:
            args = ["-p", str(directory), "-e", str(directory / "error.log"), "-c", str(path)]
            self.proc = subprocess.Popen(
                [binary, *args, "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def logs(self) -> str:
        out = (self.directory / "stderr").read_text(errors="replace")
        log = self.directory / "error.log"
        return out + (log.read_text(errors="replace") if log.exists() else "")

    def wait_listening(self, port: int, timeout: float = PROMPT) -> None:
        """Until ``port`` accepts; fails at once if nginx exits (bad config)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"nginx exited {self.proc.returncode}:\n{self.logs()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"nginx did not listen:\n{self.logs()}"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
