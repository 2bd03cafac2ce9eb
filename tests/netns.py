"""Several hosts on one machine for tests: Linux network namespaces joined by veth pairs (needs root).

:class:`Star` builds one namespace for the coordinator ("hub") and one per worker ("spoke"), each
spoke joined to the hub by its own point-to-point veth pair in a private test range::

    hub  10.213.<i>.1/24  <-- veth hub<i> / spoke<i> -->  10.213.<i>.2/24  spoke i

Nothing is created in the caller's namespace: the veth ends are made directly inside the
namespaces, so their names cannot clash with other interfaces on the machine, and the traffic
stays inside the namespaces. A spoke's link can be cut (``ip link set DEV down``: packets are
lost, nothing is reset) and restored, and limited with a ``tc tbf`` bandwidth shaper.
:meth:`Star.close` deletes every namespace it made (their veths go with them); namespaces left
by a test process that was killed before it could clean up carry that process's pid in their
name and are removed by the next :func:`remove_stale`.

Only iproute2 (``ip``, ``tc``) is needed: Debian's ``iproute2`` package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

PREFIX = "arcsim-t"  # namespace names: PREFIX-<pid of the test process>-<role>
SUBNET = "10.213"  # hub side 10.213.<i>.1, spoke side 10.213.<i>.2 (private, used only inside the namespaces)
TOOLS = ("ip", "tc")


class NetnsError(RuntimeError):
    """An ``ip`` / ``tc`` command failed; the message holds the command and its stderr."""


def ip(*args: str, timeout: float = 10.0) -> str:
    """Run ``ip ARGS`` (or ``tc`` when the first argument is ``"tc"``); returns stdout, raises NetnsError."""
    command = list(args) if args and args[0] == "tc" else ["ip", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(command)}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be used here (not root, a tool missing, creation refused), or None."""
    if os.geteuid() != 0:
        return "not running as root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian package iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as error:
        return f"cannot create a network namespace: {error}"
    try:
        ip("netns", "delete", probe)
    except NetnsError as error:
        return f"cannot delete a network namespace: {error}"
    return None


def ours() -> list[str]:
    """Every namespace made by this module, by any process."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    return [name for name in names if name.startswith(PREFIX + "-")]


def remove_stale() -> list[str]:
    """Delete the namespaces whose test process is gone (killed before its cleanup ran); returns them."""
    removed = []
    for name in ours():
        match = re.fullmatch(rf"{re.escape(PREFIX)}-(\d+)-.*", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            try:
                ip("netns", "delete", name)
                removed.append(name)
            except NetnsError:
                pass
    return removed


@dataclass
class Star:
    """A hub namespace and ``spokes`` spoke namespaces, each joined to the hub by a veth pair."""

    spokes: int
    tag: str = "star"
    namespaces: list[str] = field(default_factory=list)  # every namespace made so far, for close()

    def __post_init__(self) -> None:
        if not 1 <= self.spokes <= 250:
            raise ValueError(f"spokes must be in 1..250, got {self.spokes}")
        base = f"{PREFIX}-{os.getpid()}-{self.tag}"
        self.hub = f"{base}-hub"
        self.spoke_names = [f"{base}-{i}" for i in range(self.spokes)]
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for name in (self.hub, *self.spoke_names):
            ip("netns", "add", name)
            self.namespaces.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        for i, spoke in enumerate(self.spoke_names):
            ip(
                "link",
                "add",
                self.hub_dev(i),
                "netns",
                self.hub,
                "type",
                "veth",
                "peer",
                "name",
                self.spoke_dev(i),
                "netns",
                spoke,
            )
            ip("-n", self.hub, "addr", "add", f"{self.hub_address(i)}/24", "dev", self.hub_dev(i))
            ip("-n", spoke, "addr", "add", f"{SUBNET}.{i}.2/24", "dev", self.spoke_dev(i))
            ip("-n", self.hub, "link", "set", self.hub_dev(i), "up")
            ip("-n", spoke, "link", "set", self.spoke_dev(i), "up")

    # --- names and addresses ----------------------------------------------------------------------
    @staticmethod
    def hub_dev(i: int) -> str:
        return f"hub{i}"

    @staticmethod
    def spoke_dev(i: int) -> str:
        return f"spoke{i}"

    @staticmethod
    def hub_address(i: int) -> str:
        """The hub's address as spoke ``i`` reaches it."""
        return f"{SUBNET}.{i}.1"

    def exec_prefix(self, namespace: str) -> list[str]:
        """Prepend to a command to run it inside ``namespace`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", namespace]

    # --- faults -----------------------------------------------------------------------------------
    def cut(self, i: int) -> None:
        """Partition spoke ``i`` from the hub: its end of the link goes down, packets are lost."""
        ip("-n", self.spoke_names[i], "link", "set", self.spoke_dev(i), "down")

    def restore(self, i: int) -> None:
        """Bring spoke ``i``'s link back up (its address and route come back with it)."""
        ip("-n", self.spoke_names[i], "link", "set", self.spoke_dev(i), "up")

    def limit(self, i: int, rate: str, *, burst: str = "16kb", latency: str = "100ms") -> None:
        """Shape both directions of spoke ``i``'s link to ``rate`` (e.g. ``"20mbit"``) with tc tbf."""
        for namespace, dev in ((self.spoke_names[i], self.spoke_dev(i)), (self.hub, self.hub_dev(i))):
            ip(
                "tc",
                "-n",
                namespace,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                burst,
                "latency",
                latency,
            )

    def shaped(self, i: int) -> dict[str, int]:
        """The tbf counters of spoke ``i``'s uplink (spoke -> hub): bytes and packets sent, overlimits."""
        text = ip("tc", "-n", self.spoke_names[i], "-s", "qdisc", "show", "dev", self.spoke_dev(i))
        match = re.search(r"qdisc tbf .*?Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", text, re.S)
        if match is None:
            raise NetnsError(f"no tbf qdisc on {self.spoke_dev(i)} in {self.spoke_names[i]}: {text!r}")
        sent, packets, dropped, overlimits = (int(g) for g in match.groups())
        return {"bytes": sent, "packets": packets, "dropped": dropped, "overlimits": overlimits}

    def close(self) -> list[str]:
        """Delete every namespace made (their veths and qdiscs go with them); returns those that failed."""
        failed = []
        for name in reversed(self.namespaces):
            try:
                ip("netns", "delete", name)
            except (NetnsError, subprocess.TimeoutExpired):
                failed.append(name)
        self.namespaces = []
        return failed
