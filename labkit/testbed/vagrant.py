"""The ``vagrant`` testbed: labkit's kubeadm cluster on Vagrant VMs (python-vagrant).

``up`` brings the VMs up (``vagrant up``: see the ``Vagrantfile`` and
``vagrant/settings.yaml``) when they are not running, pins each VM's SSH host
key in the lab's own known_hosts (``.vagrant/labkit_known_hosts``), builds an
:class:`~labkit.testbed.cluster.Inventory` from ``vagrant ssh-config``, and
applies the iteration over SSH like the ``ssh`` testbed does.

Host keys: ``vagrant ssh-config`` says ``StrictHostKeyChecking no``; labkit
ignores that.  Right after ``vagrant up`` it reads each VM's host key through
``vagrant ssh`` (the channel Vagrant itself trusts) and pins it; from then on
every connection is checked against the pin, and a VM re-created behind
labkit's back is refused until :meth:`VagrantTestbed.destroy` (or removing its
line) clears the pin.
"""

from __future__ import annotations

import base64
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import yaml

from labkit.exceptions import HostKeyError, ScenarioError, TestbedError
from labkit.manifests import MANIFEST_DIR
from labkit.hostkeys import known_hosts_name, pin_host_key
from labkit.testbed.cluster import ClusterTestbed, Inventory, InventoryHost

log = logging.getLogger(__name__)

PROJECT_DIR = MANIFEST_DIR.parent
CONTROL_PLANE, CLIENT = "control-plane", "client"
HOST_KEY_FILE = "/etc/ssh/ssh_host_ed25519_key.pub"


@dataclass(frozen=True)
class SSHLogin:
    """How to log in to one machine: its ``Host`` entry of an ssh_config, as Paramiko reads it.

    Attributes:
        machine: the ``Host`` name (the Vagrant machine).
        hostname, port, user: where to connect and as whom (``user`` None: not given).
        identity_files: the private keys, in the order given, ``~`` expanded.
        options: every option Paramiko looked up for the machine, lower-cased
            (e.g. ``stricthostkeychecking``, ``userknownhostsfile``,
            ``hostkeyalgorithms``: read, not obeyed; labkit pins host keys itself).
    """

    machine: str
    hostname: str
    port: int
    user: str | None
    identity_files: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def ssh_login(text: str, machine: str, *, source: str = "vagrant ssh-config") -> SSHLogin:
    """The login of ``machine`` from ssh_config text (``vagrant ssh-config`` output).

    Parsed and looked up by :class:`paramiko.SSHConfig`, so ``Key value`` and
    ``Key=value``, quoted values, comments and ``Host *`` defaults mean what
    they mean to ssh_config(5).

    Args:
        text: the configuration.
        machine: the ``Host`` entry wanted.
        source: where the text came from, for errors.

    Raises:
        TestbedError: the text does not parse, has no ``Host`` entry for
            ``machine`` (the message names it and the entries there are), or its
            ``Port`` is not a number.
    """
    try:
        config = paramiko.SSHConfig.from_text(text)
        hosts = config.get_hostnames()
        if machine not in hosts:
            listed = ", ".join(sorted(h for h in hosts if h != "*")) or "none"
            raise TestbedError(f"{source} has no Host entry for machine {machine!r} (entries: {listed})")
        entry = config.lookup(machine)
    except paramiko.SSHException as exc:  # ConfigParseError, CouldNotCanonicalize
        raise TestbedError(f"{source}: {exc}") from None
    port = str(entry.get("port", "22"))
    if not port.isdigit():
        raise TestbedError(f"{source}: Host {machine}: Port {port!r} is not a number")
    return SSHLogin(machine, entry["hostname"], int(port), entry.get("user"),
                    tuple(os.path.expanduser(k) for k in entry.get("identityfile", [])), dict(entry))


def load_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read the Vagrant settings file (``vagrant/settings.yaml`` or ``$LABKIT_VAGRANT_SETTINGS``).

    Raises:
        ScenarioError: unreadable, or a field labkit needs is missing.
    """
    path = Path(path or os.environ.get("LABKIT_VAGRANT_SETTINGS")
                or PROJECT_DIR / "vagrant" / "settings.yaml")
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"cannot read: {exc}", path=str(path)) from None
    for key in ("network_prefix", "control_plane_ip", "worker_ip_start", "client_ip", "workers", "provider"):
        if not isinstance(doc, dict) or key not in doc:
            raise ScenarioError("missing", path=str(path), field=key)
    return doc


def machine_addresses(settings: dict[str, Any]) -> dict[str, str]:
    """Machine name -> its fixed private address, as the Vagrantfile assigns them."""
    net = settings["network_prefix"]
    out = {CONTROL_PLANE: f"{net}.{settings['control_plane_ip']}", CLIENT: f"{net}.{settings['client_ip']}"}
    for i in range(1, int(settings["workers"]) + 1):
        out[f"worker-{i}"] = f"{net}.{int(settings['worker_ip_start']) + i - 1}"
    return out


def inventory_from_ssh_config(entries: dict[str, SSHLogin], settings: dict[str, Any], *,
                              node: str, known_hosts: Path, via_netns: str | None = None) -> Inventory:
    """The cluster's :class:`Inventory` from ``vagrant ssh-config`` and the settings.

    Logins come from ssh-config (address, port, user, keys); the node's service
    address is its private-network address.  The control plane and the nodes
    are driven as root through ``sudo``; the client runs the load as the user.

    Raises:
        TestbedError: a machine of the settings is missing from ssh-config.
    """
    addresses = machine_addresses(settings)
    hosts = {}
    for name, private_ip in addresses.items():
        entry = entries.get(name)
        if entry is None:
            raise TestbedError(f"vagrant ssh-config has no machine {name!r} (machines: "
                               f"{', '.join(entries) or 'none'}); is it up? `vagrant status`")
        hosts[name] = InventoryHost(
            name, entry.hostname, entry.port, entry.user, entry.identity_files,
            sudo=name != CLIENT, node_name=name, node_ip=private_ip)
    if node not in hosts:
        raise TestbedError(f"no machine {node!r} to measure; machines: {', '.join(hosts)}")
    return Inventory(hosts, kubectl=CONTROL_PLANE, node=node, client=CLIENT, known_hosts=known_hosts,
                     trust_on_first_use=False, source="vagrant ssh-config", via_netns=via_netns)


def parse_host_key(text: str, where: str) -> paramiko.PKey:
    """The key of a ``TYPE BASE64 [COMMENT]`` public key line.

    Raises:
        HostKeyError: not such a line.
    """
    parts = text.strip().split()
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as exc:  # any malformed line: say where it came from
        raise HostKeyError(f"{where}: not a public host key line ({exc}): {text.strip()[:80]!r}") from None


def pin_machine_key(vagrant: Any, entry: SSHLogin, known_hosts: Path) -> None:
    """Pin a machine's host key, read through ``vagrant ssh`` (the channel Vagrant trusts),
    in ``known_hosts``, unless a key is pinned for its address already (a changed key is
    then refused when labkit connects).

    Raises:
        TestbedError: the key file's line is not a host key.
    """
    label = known_hosts_name(entry.hostname, entry.port)
    pinned = paramiko.HostKeys(str(known_hosts)) if known_hosts.exists() else paramiko.HostKeys()
    if pinned.lookup(label):
        return
    line = vagrant.ssh(vm_name=entry.machine, command=shlex.join(["cat", HOST_KEY_FILE]))
    pin_host_key(known_hosts, label, parse_host_key(line, f"{entry.machine}:{HOST_KEY_FILE}"))


def vagrant_machine_host(machine: str, *, root: str | os.PathLike | None = None, vagrant: Any = None,
                         via_netns: str | None = None, known_hosts: str | os.PathLike | None = None):
    """A machine of a Vagrantfile (``--on vagrant:lab``) as an :class:`~labkit.remote.SSHHost`
    logged in as Vagrant's user, privileged through ``sudo -n``, its host key pinned.

    The key is pinned in ``labkit_known_hosts`` of the Vagrant folder
    (``$VAGRANT_DOTFILE_PATH`` or ``ROOT/.vagrant``), so ``vagrant destroy`` + ``up``
    of the machine is refused until that line is removed.

    Args:
        machine: the Vagrant machine (``lab``).
        root: the directory of the ``Vagrantfile`` ($LABKIT_VAGRANT_DIR, else labkit's project).
        vagrant: a python-vagrant ``Vagrant`` (made for ``root`` by default).
        via_netns: connect from inside this network namespace of this machine.
        known_hosts: where the key is pinned (default as above).

    Raises:
        TestbedError: Vagrant failed (is the machine up?) or said nothing usable.
    """
    from labkit.remote import SSHHost

    root = Path(root or os.environ.get("LABKIT_VAGRANT_DIR") or PROJECT_DIR)
    if vagrant is None:
        import vagrant as python_vagrant

        vagrant = python_vagrant.Vagrant(root=str(root), quiet_stdout=False, quiet_stderr=False)
    try:
        entry = ssh_login(vagrant.ssh_config(vm_name=machine), machine)
    except TestbedError:
        raise
    except Exception as exc:  # python-vagrant raises CalledProcessError
        raise TestbedError(f"vagrant ssh-config {machine} failed in {root} ({exc}); is it up? "
                           f"`vagrant up {machine}` there brings it up (docs/vagrant.md)") from None
    known_hosts = Path(known_hosts or Path(os.environ.get("VAGRANT_DOTFILE_PATH") or root / ".vagrant")
                       / "labkit_known_hosts")
    pin_machine_key(vagrant, entry, known_hosts)
    return SSHHost(entry.hostname, port=entry.port, username=entry.user, key_filename=list(entry.identity_files),
                   known_hosts=known_hosts, name=f"vagrant:{machine}", sudo=True, via_netns=via_netns)


class VagrantTestbed(ClusterTestbed):
    """labkit's Vagrant cluster as a testbed.

    Args:
        root: the directory of the ``Vagrantfile`` (default: labkit's project, or
            ``$LABKIT_VAGRANT_DIR``).
        node: the worker to measure (default ``worker-1``).
        settings: the settings file (default as the Vagrantfile reads it).
        vagrant: a python-vagrant ``Vagrant`` object (made for ``root`` by default).
        via_netns: reach the VMs from inside this network namespace (the lab's own
            libvirt runs its guests in one: :mod:`labkit.vm.libvirtd`).
        driver_options: passed to :class:`~labkit.testbed.kubeadm.KubeadmDriver`.
    """

    name = "vagrant"

    def __init__(self, *, root: str | os.PathLike | None = None, node: str = "worker-1",
                 settings: str | os.PathLike | None = None, vagrant: Any = None,
                 helper_rule: bool = True, via_netns: str | None = None, **ignored: Any):
        self.via_netns = via_netns
        self.root = Path(root or os.environ.get("LABKIT_VAGRANT_DIR") or PROJECT_DIR)
        self.settings = load_settings(settings)
        self.node_machine = node
        self.known_hosts = self.root / ".vagrant" / "labkit_known_hosts"
        if vagrant is None:
            import vagrant as python_vagrant  # python-vagrant: only needed for this testbed
            vagrant = python_vagrant.Vagrant(root=str(self.root), quiet_stdout=False, quiet_stderr=False)
        self.vagrant = vagrant
        super().__init__(self._inventory_from_vagrant, state_path=self.root / ".vagrant" / "labkit-state.json",
                         helper_rule=helper_rule)

    def machines(self) -> dict[str, str]:
        """The cluster's machine name -> state (``running``, ``not_created``, ``shutoff``, ...).

        Other machines of the Vagrantfile (the opt-in ``lab``) are not the cluster's.
        """
        cluster = machine_addresses(self.settings)
        return {s.name: s.state for s in self.vagrant.status() if s.name in cluster}

    def ssh_entries(self) -> dict[str, SSHLogin]:
        """The login of each cluster machine, from its ``vagrant ssh-config`` (asked one by
        one: Vagrant refuses the whole command while any machine, e.g. ``lab``, is not created).

        Raises:
            TestbedError: a machine's ssh-config has no entry for it, or a bad one.
        """
        return {name: ssh_login(self.vagrant.ssh_config(vm_name=name), name)
                for name in machine_addresses(self.settings)}

    def bring_up(self) -> None:
        """``vagrant up`` unless every machine runs; then pin every machine's host key."""
        states = self.machines()
        if not states or any(state != "running" for state in states.values()):
            log.info("vagrant up (machines: %s); the first bring-up takes 10-20 minutes", states)
            try:
                self.vagrant.up(provider=self.settings["provider"])
            except Exception as exc:  # python-vagrant raises CalledProcessError
                raise TestbedError(f"vagrant up failed in {self.root}: {exc}; see its output above "
                                   "and docs/vagrant.md") from None
        self.pin_host_keys()

    def pin_host_keys(self) -> None:
        """Pin each machine's host key, read through ``vagrant ssh``, in the lab's known_hosts
        (machines already pinned are left alone).

        Raises:
            HostKeyError: a machine now has a different key than the pinned one.
        """
        for name, entry in self.ssh_entries().items():
            pin_machine_key(self.vagrant, entry, self.known_hosts)

    def _inventory_from_vagrant(self) -> Inventory:
        try:
            entries = self.ssh_entries()
        except TestbedError:
            raise
        except Exception as exc:  # CalledProcessError when the machines are not up
            raise TestbedError(f"vagrant ssh-config failed in {self.root} ({exc}); are the VMs up? "
                               "`labkit up --testbed vagrant` brings them up") from None
        return inventory_from_ssh_config(entries, self.settings,
                                         node=self.node_machine, known_hosts=self.known_hosts,
                                         via_netns=self.via_netns)

    def up(self, iteration) -> None:
        """Bring the VMs up if needed, then apply ``iteration`` over SSH."""
        self.bring_up()
        super().up(iteration)

    def status(self) -> dict[str, Any]:
        """The status document, with the machines' states."""
        try:
            machines = self.machines()
        except Exception as exc:  # vagrant itself failed: report, do not crash status
            machines = {"error": str(exc)}
        if self.state_path.exists():
            doc = super().status()
        else:
            doc = {"testbed": self.name, "state": "down", "hosts": []}
        doc["machines"] = machines
        doc["vagrant_dir"] = str(self.root)
        return doc

    def destroy(self) -> None:
        """Undo labkit's changes if any, ``vagrant destroy`` the VMs, forget their keys."""
        if self.state_path.exists() and all(s == "running" for s in self.machines().values()):
            self.down()
        self.vagrant.destroy()
        self.state_path.unlink(missing_ok=True)
        self.known_hosts.unlink(missing_ok=True)
