"""Two "hosts" on one machine: network namespaces joined by a veth pair, each with its own address.

Needs root (CAP_NET_ADMIN) and iproute2 (.ci/run installs it); `hosts()` skips the test where namespaces
cannot be made. Traffic stays on this machine; only addresses made here are used.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    interface: str

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces on 10.231.N.0/24 (N random, so parallel sessions do not meet), removed afterwards."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2 (`apt-get install iproute2`)")
    tag = f"my{os.getpid() % 10000}"
    net = random.randint(1, 250)
    pair = (Host(f"{tag}a", f"10.231.{net}.1", f"{tag}va"), Host(f"{tag}b", f"10.231.{net}.2", f"{tag}vb"))
    try:
        for host in pair:
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        _ip("link", "add", pair[0].interface, "netns", pair[0].namespace, "type", "veth", "peer", "name",
            pair[1].interface, "netns", pair[1].namespace)
        for host in pair:
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
    except (subprocess.CalledProcessError, OSError) as err:
        for host in pair:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {getattr(err, 'stderr', err)!r}")
    try:
        yield pair
    finally:
        for host in pair:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
            shutil.rmtree(hosts_file(host).parent, ignore_errors=True)


NAMES = ("node0", "node1")
"""The hostnames the hosts get under `as_host`, resolvable on every host after `name_hosts`."""


def hosts_file(host: Host) -> Path:
    """`ip netns exec NS` mounts /etc/netns/NS/hosts on /etc/hosts; `as_host` does the same."""
    return Path("/etc/netns") / host.namespace / "hosts"


def name_hosts(pair: tuple[Host, ...]) -> None:
    """Every host resolves every host's name (NAMES) to its address."""
    lines = ["127.0.0.1 localhost"] + [f"{h.address} {name}" for h, name in zip(pair, NAMES)]
    for host in pair:
        hosts_file(host).parent.mkdir(parents=True, exist_ok=True)
        hosts_file(host).write_text("\n".join(lines) + "\n")


def as_host(pair: tuple[Host, ...], index: int, *argv: str) -> list[str]:
    """`argv` on host `index` as its own machine: its network, its hostname (UTS namespace), its hosts
    file. nsenter rather than `ip netns exec`, which remounts /sys and hides the cgroups (slurmd needs
    them)."""
    host = pair[index]
    return ["nsenter", f"--net=/run/netns/{host.namespace}", "unshare", "--mount", "--uts", "sh", "-c",
            f'mount --bind {hosts_file(host)} /etc/hosts && hostname {NAMES[index]} && exec "$@"', "sh", *argv]


def set_link(host: Host, up: bool) -> None:
    """Plug or pull `host`'s cable: its end of the veth pair."""
    _ip("-n", host.namespace, "link", "set", host.interface, "up" if up else "down")
