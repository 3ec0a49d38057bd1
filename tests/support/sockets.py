"""Which process holds the gateway's end of a loopback connection, read from
/proc: how a test pins a connection to a worker, or sees the gateway let go."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def server_socket_inode(gateway_port: int, client_port: int) -> str | None:
    """The inode of the gateway's socket for our connection from ``client_port``
    ("0" once no process holds it: closed, left to the kernel), or None."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if (
            int(local.rsplit(":", 1)[1], 16) == gateway_port
            and int(remote.rsplit(":", 1)[1], 16) == client_port
        ):
            return inode
    return None


def gateway_holds(gateway_port: int, client_port: int) -> bool:
    """Whether a process still holds the gateway's end of the client connection."""
    return server_socket_inode(gateway_port, client_port) not in (None, "0")


def owner_of(gateway_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the gateway's end of the client connection."""
    inode = server_socket_inode(gateway_port, client_port)
    if inode in (None, "0"):
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None
