"""Lab VMs under the lab's libvirt: ``vagrant`` run where the guests are, guests over Paramiko.

:class:`VagrantLab` runs Vagrant (the project's ``Vagrantfile``, a settings file
that picks the local box) inside the lab's network namespace
(:class:`~labkit.vm.libvirtd.LibvirtLab`), with its own ``VAGRANT_HOME`` and
``.vagrant`` folder outside the repository.  :meth:`VagrantLab.host` gives a
machine as an :class:`~labkit.remote.SSHHost` whose TCP connection is made inside
that namespace, with the guest's host key pinned (read through ``vagrant ssh``,
the channel Vagrant trusts) and checked from then on.

The netns testbed runs in a lab VM driven from the host with ``--on vagrant:lab``
(:mod:`labkit.remote.targets`); labkit's source gets there through
:func:`labkit.remote.deploy.deploy_labkit` (the box holds its Python dependencies,
so nothing is installed in the guest).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from pathlib import Path


from labkit.exceptions import TestbedError, VMError
from labkit.host import Result
from labkit.remote import SSHHost
from labkit.testbed.vagrant import SSHLogin, ssh_login, vagrant_machine_host
from labkit.vm.box import BOX_NAME
from labkit.vm.libvirtd import LibvirtLab

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]


class VagrantLab:
    """Vagrant for the lab's VMs, run inside the lab's libvirt namespace.

    Args:
        libvirt: the running :class:`LibvirtLab`.
        work: a folder for Vagrant's state (``home/`` = VAGRANT_HOME, ``dot/`` = the
            ``.vagrant`` folder, ``known_hosts``).
        settings: the settings file the Vagrantfile reads (``box_source: local``).
        root: the folder of the ``Vagrantfile`` (labkit's project by default).
    """

    def __init__(self, libvirt: LibvirtLab, work: str | os.PathLike, settings: str | os.PathLike,
                 root: str | os.PathLike = PROJECT_DIR):
        self.libvirt = libvirt
        self.work = Path(work)
        self.settings = Path(settings)
        self.root = Path(root)
        self.known_hosts = self.work / "known_hosts"
        (self.work / "home").mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        """The environment Vagrant runs with."""
        return dict(os.environ, VAGRANT_HOME=str(self.work / "home"),
                    VAGRANT_DOTFILE_PATH=str(self.work / "dot"), VAGRANT_CHECKPOINT_DISABLE="1",
                    VAGRANT_DEFAULT_PROVIDER="libvirt", LABKIT_VAGRANT_SETTINGS=str(self.settings))

    def vagrant(self, *args: str, timeout: float = 900) -> Result:
        """Run ``vagrant ARGS`` in the lab's namespace.

        Raises:
            VMError: it failed (its output's tail in the message) or timed out.
        """
        argv = self.libvirt.exec_prefix() + ["vagrant", *args]
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=self.root, env=self.env(), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VMError(f"vagrant {' '.join(args)} did not finish within {timeout:g} s") from None
        result = Result(" ".join(["vagrant", *args]), "vagrant", proc.returncode, proc.stdout,
                        proc.stderr, time.monotonic() - start)
        if not result.ok:
            tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-20:])
            raise VMError(f"vagrant {' '.join(args)} failed (exit {proc.returncode}) in {self.root}:\n{tail}")
        return result

    def add_box(self, box: str | os.PathLike, key: str, name: str = BOX_NAME) -> bool:
        """``vagrant box add`` a box as ``name`` (labkit's by default) unless this build
        of it is there already.

        Returns:
            True when it was added now.
        """
        marker = self.work / "home" / f"{name.replace('/', '_')}.key"
        if marker.exists() and marker.read_text() == key and name in self.vagrant("box", "list").stdout:
            return False
        self.vagrant("box", "add", "--force", "--name", name, str(box), timeout=600)
        marker.write_text(key)
        return True

    def python_vagrant(self):
        """A python-vagrant ``Vagrant`` (what the ``vagrant`` testbed uses) that runs
        ``vagrant`` inside the lab's namespace with this lab's environment."""
        import vagrant as python_vagrant

        wrapper = self.work / "vagrant-in-netns"
        wrapper.write_text("#!/bin/sh\n# vagrant where the lab's guests are (labkit.vm.guest)\n"
                           f"exec {shlex.join(self.libvirt.exec_prefix())} vagrant \"$@\"\n")
        wrapper.chmod(0o755)
        v = python_vagrant.Vagrant(root=str(self.root), env=self.env(), quiet_stdout=False, quiet_stderr=False)
        v._vagrant_exe = str(wrapper)  # python-vagrant's executable (found on PATH otherwise)
        return v

    def up(self, *machines: str) -> Result:
        """``vagrant up MACHINES`` (libvirt provider)."""
        return self.vagrant("up", "--provider=libvirt", *machines, timeout=1800)

    def destroy(self) -> None:
        """``vagrant destroy -f`` every machine, and forget their pinned keys."""
        if (self.work / "dot").exists():
            self.vagrant("destroy", "-f", timeout=600)
        self.forget_keys()

    def forget_keys(self) -> None:
        """Forget every host key pinned for this lab's machines: this lab's own file and the
        Vagrant folder's ``labkit_known_hosts``, where ``labkit ... --on vagrant:NAME`` pins."""
        self.known_hosts.unlink(missing_ok=True)
        (self.work / "dot" / "labkit_known_hosts").unlink(missing_ok=True)

    def ssh_config(self, machine: str) -> SSHLogin:
        """``machine``'s login, from ``vagrant ssh-config MACHINE``.

        Raises:
            VMError: vagrant failed, or its output has no (valid) entry for ``machine``.
        """
        try:
            return ssh_login(self.vagrant("ssh-config", machine, timeout=120).stdout, machine)
        except TestbedError as exc:
            raise VMError(str(exc)) from None

    def host(self, machine: str) -> SSHHost:
        """``machine`` as an :class:`SSHHost` (Paramiko, ``sudo -n``), reached inside the lab's
        namespace, its host key (read through ``vagrant ssh``) pinned in ``known_hosts`` and checked
        (:func:`~labkit.testbed.vagrant.vagrant_machine_host`)."""
        return vagrant_machine_host(machine, root=self.root, vagrant=self.python_vagrant(),
                                    via_netns=self.libvirt.netns, known_hosts=self.known_hosts)
