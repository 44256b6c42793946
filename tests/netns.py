"""Two hosts on one machine, for tests that must cross a network: Linux network namespaces.

    with two_hosts() as (a, b):          # a.addr 10.231.0.1, b.addr 10.231.0.2, a veth pair between
        subprocess.Popen(a.command(["torchrun", ...]))   # runs as host "salnet-a", in a's network

Each host is a network namespace with its own loopback and one end of a veth pair (nothing is added
to this machine's own network: both ends live in the namespaces), its own hostname (a UTS namespace),
an /etc/hosts that names both hosts by their addresses (what a cluster's DNS does; `ip netns exec`
bind-mounts /etc/netns/NS/hosts over /etc/hosts), and, unless told otherwise, its own empty /tmp (a
tmpfs in the mount namespace `ip netns exec` makes, with the checkout bound back in where it lies under
/tmp). So a program that assumes localhost, this
machine's hostname or a /tmp shared between nodes fails here as it would on two machines; files the
hosts must share go elsewhere (the tests' shared directory is under /var/tmp).

Set-up needs root, `ip` (iproute2) and `unshare` (util-linux); `unavailable()` says why not. The
context manager always tears down: it kills what still runs in the namespaces and deletes them, and at
set-up it removes what a killed earlier session left (namespaces named after a pid that is gone).

`python tests/netns.py --hostname NAME [--shared-tmp] -- ARGV...` is the step inside a host that
`Host.command` puts after `ip netns exec NS unshare --uts`: set the hostname, mount the private /tmp,
exec ARGV.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "salnet-"  # namespaces are salnet-PID-HOSTINDEX: a later session can tell whose they were
SUBNET = "10.231.0"  # each pair of hosts is its own isolated link: concurrent pairs may reuse it
NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class Host:
    """One host: its namespace, hostname and address."""

    netns: str
    hostname: str
    addr: str

    def command(self, argv: Sequence[str], private_tmp: bool = True) -> list[str]:
        """The argv that runs `argv` on this host (an argv list end to end: no shell)."""
        inside = [sys.executable, str(Path(__file__).resolve()), "--hostname", self.hostname]
        if not private_tmp:
            inside.append("--shared-tmp")
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--", *inside, "--", *map(str, argv)]

    def pids(self) -> list[int]:
        """The processes running in this host's network namespace now."""
        proc = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a reason for a skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    missing = [tool for tool in ("ip", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (iproute2, util-linux)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(netns: str) -> None:
    """Kill what runs in `netns` (processes this session started there), then delete it and its /etc files."""
    host = Host(netns, "", "")
    for _ in range(50):
        pids = host.pids()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier sessions whose process is gone (killed before tearing down)."""
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    stale = []
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{re.escape(PREFIX)}(\d+)-\w+", name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(name)
            stale.append(name)
    return stale


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Two hosts joined by a veth pair (see the module docstring); torn down on exit, whatever happened."""
    remove_stale()
    tag = f"{PREFIX}{os.getpid()}"
    hosts = tuple(Host(f"{tag}-{i}", f"salnet-{'ab'[i]}", f"{SUBNET}.{i + 1}") for i in range(2))
    links = [f"sn{os.getpid()}{'ab'[i]}" for i in range(2)]  # interface names: at most 15 characters
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.hostname}\n" for h in hosts)
    made: list[str] = []
    try:
        for host in hosts:
            _ip("netns", "add", host.netns)
            made.append(host.netns)
            (NETNS_ETC / host.netns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.netns / "hosts").write_text(hosts_file)
        # Both ends are created inside the namespaces: this machine's own network is never touched.
        _ip(
            "link",
            "add",
            links[0],
            "netns",
            hosts[0].netns,
            "type",
            "veth",
            "peer",
            "name",
            links[1],
            "netns",
            hosts[1].netns,
        )
        for host, link in zip(hosts, links, strict=True):
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", link)
            _ip("-n", host.netns, "link", "set", link, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for netns in made:
            _remove(netns)


def _inside(argv: list[str] | None = None) -> None:
    """Run inside a host (see the module docstring): hostname, private /tmp, then exec the command."""
    parser = argparse.ArgumentParser(prog="python tests/netns.py", description="the step inside a host")
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--shared-tmp", action="store_true", help="keep this machine's /tmp (default: an empty one)")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    socket.sethostname(args.hostname)  # in the UTS namespace `unshare --uts` made: this host only
    if not args.shared_tmp:
        # The checkout and its interpreter stay: on a cluster the code is on every node (a CI clone
        # may well live under /tmp).
        _private_tmp([Path(__file__).resolve().parents[1], Path(sys.prefix).resolve()])
    os.execvp(args.command[0], args.command)


def _private_tmp(keep: list[Path]) -> None:
    """An empty tmpfs over /tmp, with the directories of `keep` that lie under /tmp bound back into it.

    The mount namespace is the one `ip netns exec` made: these mounts do not propagate out of it. The
    old /tmp is reached through a bind mount outside it, made before the tmpfs hides it."""
    under = sorted({p for p in keep if Path("/tmp") in p.parents})
    window = Path(f"/run/salnet-old-tmp-{os.getpid()}")
    if under:
        window.mkdir(parents=True)
        subprocess.run(["mount", "--bind", "/tmp", str(window)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=1g", "salnet-tmp", "/tmp"], check=True)
    for path in under:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(window / path.relative_to("/tmp")), str(path)], check=True)
    if under:
        subprocess.run(["umount", str(window)], check=True)  # the bound directories keep what they need
        window.rmdir()


if __name__ == "__main__":
    _inside()
