"""``--on MACHINE``: the Linux machine a netns testbed runs on, named the way a user names it.

Three forms, as ``labkit up --testbed netns --on ...`` takes them:

- ``vagrant:NAME``: a machine of a Vagrantfile (``vagrant:lab``, labkit's one-VM lab
  for laptops): its login comes from ``vagrant ssh-config NAME`` run in
  ``$LABKIT_VAGRANT_DIR`` (default labkit's project), and its host key, read once
  through ``vagrant ssh`` (the channel Vagrant trusts), is pinned in
  ``labkit_known_hosts`` of the Vagrant folder and checked from then on.
- ``NAME`` listed under ``hosts:`` of an inventory file (``$LABKIT_INVENTORY`` or
  ``./inventory.yaml``; the same fields as the ``ssh`` testbed's, see
  :mod:`labkit.testbed.cluster`; the roles ``kubectl``/``node``/``client`` are not
  needed for a lab machine).
- ``[user@]host[:port]``: any machine over SSH, its host key checked against the
  lab's known_hosts (``--trust-on-first-use`` pins an unknown one).

A user other than root runs the lab's commands through ``sudo -n``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from labkit.exceptions import ScenarioError, TestbedError
from labkit.remote.sshhost import SSHHost

_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]+")


@dataclass(frozen=True)
class Target:
    """What ``--on`` named.

    Attributes:
        kind: ``vagrant``, ``inventory`` or ``ssh``.
        name: the Vagrant machine, the inventory host, or the address.
        user: the login (``ssh`` form only; None: the local user's name).
        port: the SSH port (``ssh`` form only).
    """

    kind: str
    name: str
    user: str | None = None
    port: int = 22

    def __str__(self) -> str:
        if self.kind == "vagrant":
            return f"vagrant:{self.name}"
        if self.kind == "inventory":
            return self.name
        address = self.name if self.port == 22 else (
            f"[{self.name}]:{self.port}" if ":" in self.name else f"{self.name}:{self.port}")
        return f"{self.user}@{address}" if self.user else address


def parse_target(spec: str, inventory_names: frozenset[str] | set[str] = frozenset()) -> Target:
    """Read an ``--on`` value (no connection made).

    Args:
        spec: ``vagrant:NAME``, an inventory host's name, or ``[user@]host[:port]``.
        inventory_names: the hosts of the inventory file, if there is one.

    Raises:
        TestbedError: ``spec`` is none of the forms (the message shows them).
    """
    forms = "give vagrant:NAME, a host of the inventory, or [user@]host[:port]"
    text = (spec or "").strip()
    if not text:
        raise TestbedError(f"--on: empty machine; {forms}")
    if text.startswith("vagrant:"):
        name = text[len("vagrant:"):]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise TestbedError(f"--on {spec!r}: {name!r} is not a Vagrant machine name; {forms}")
        return Target("vagrant", name)
    if text in inventory_names:
        return Target("inventory", text)
    user, _, rest = text.rpartition("@") if "@" in text else (None, "", text)
    if user is not None and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", user):
        raise TestbedError(f"--on {spec!r}: {user!r} is not a user name; {forms}")
    host, port = rest, "22"
    bracketed = re.fullmatch(r"\[([^]]+)\](?::(\d*))?", rest)
    if bracketed:  # [address]:port, as ssh writes an IPv6 address with a port
        host, port = bracketed.group(1), bracketed.group(2) or "22"
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    if not port.isdigit():
        raise TestbedError(f"--on {spec!r}: port {port!r} is not a number; {forms}")
    port = int(port)
    if not _HOSTNAME.fullmatch(host):
        raise TestbedError(f"--on {spec!r}: {host!r} is not a host name or address; {forms}")
    if not 0 < port < 65536:
        raise TestbedError(f"--on {spec!r}: port {port} is not 1-65535; {forms}")
    return Target("ssh", host, user, port)


def _inventory_hosts(inventory: str | os.PathLike | None):
    """The inventory's hosts (``{}`` when no inventory file is given or found) and the file."""
    from labkit.testbed.cluster import load_machines

    path = Path(inventory or os.environ.get("LABKIT_INVENTORY") or "inventory.yaml").expanduser()
    if not path.is_file():
        if inventory:
            raise ScenarioError("no such inventory file", path=str(path))
        return {}, None, path
    hosts, settings = load_machines(path)
    return hosts, settings, path


def machine_for(spec: str, *, inventory: str | os.PathLike | None = None,
                trust_on_first_use: bool = False, via_netns: str | None = None) -> SSHHost:
    """The machine ``--on spec`` names, as an :class:`SSHHost` (not yet connected).

    Args:
        spec: see :func:`parse_target`.
        inventory: the inventory file for host names (default ``$LABKIT_INVENTORY``
            or ``./inventory.yaml`` when it exists).
        trust_on_first_use: pin an unknown host key (``ssh`` form; the inventory's
            own setting for its hosts; a Vagrant machine's key is always read through
            ``vagrant ssh``).
        via_netns: open the TCP connection inside this network namespace of this
            machine (default ``$LABKIT_VIA_NETNS``; the lab's own libvirt keeps its VMs
            in one).

    Raises:
        TestbedError: a bad ``spec``, or Vagrant cannot say how to reach the machine.
        ScenarioError: a bad inventory file (the field named).
        HostKeyError: a Vagrant machine's key differs from the pinned one.
    """
    via_netns = via_netns or os.environ.get("LABKIT_VIA_NETNS") or None
    hosts, settings, _ = _inventory_hosts(inventory)
    target = parse_target(spec, set(hosts))
    if target.kind == "vagrant":
        from labkit.testbed.vagrant import vagrant_machine_host

        return vagrant_machine_host(target.name, via_netns=via_netns)
    if target.kind == "inventory":
        h = hosts[target.name]
        return SSHHost(h.address, port=h.port, username=h.user, key_filename=list(h.keys) or None,
                       known_hosts=settings["known_hosts"], trust_on_first_use=settings["trust_on_first_use"],
                       name=target.name, sudo=h.sudo, via_netns=via_netns)
    sudo = target.user is not None and target.user != "root" or (target.user is None and os.geteuid() != 0)
    return SSHHost(target.name, port=target.port, username=target.user, trust_on_first_use=trust_on_first_use,
                   name=str(target), sudo=sudo, via_netns=via_netns)


def the_machine(host=None, on: str | None = None, inventory: str | os.PathLike | None = None):
    """A testbed's machine from its ``host=`` or ``on=`` option (one of them; neither: this one).

    Raises:
        TestbedError: both were given, or ``on`` is bad (see :func:`machine_for`).
    """
    if on and host is not None:
        raise TestbedError("give the netns testbed's machine once: host= or on=, not both")
    if on:
        return machine_for(on, inventory=inventory)
    if host is None:
        from labkit.host import LocalHost

        return LocalHost("init")
    return host
