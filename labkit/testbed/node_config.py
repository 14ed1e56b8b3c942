"""The node's own settings for an iteration: its sysctls and its kubelet's allowlist.

:class:`NodeConfig` is the part of :class:`~labkit.testbed.kubeadm.KubeadmDriver`
(steps 1 and 2 of an iteration) that changes files and settings on the node
itself, and puts them back:

1. node sysctls: the originals saved once, ``sysctl -w`` each value, the set
   written to ``/etc/sysctl.d/90-labkit.conf`` (a reboot keeps it), read back;
2. the kubelet's ``allowedUnsafeSysctls`` in ``/var/lib/kubelet/config.yaml``
   (original kept beside it), ``systemctl restart kubelet``, wait until the
   kubelet is healthy and the node Ready.

It records what it changed in the driver's state (one state file for the
whole testbed), so that :meth:`NodeConfig.restore` undoes exactly that.
"""

from __future__ import annotations

from typing import Any, Callable

import yaml

from labkit.exceptions import SysctlError, TestbedError
from labkit.host import Host, Result

KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
KUBELET_BACKUP = KUBELET_CONFIG + ".labkit-orig"
SYSCTL_FILE = "/etc/sysctl.d/90-labkit.conf"
KUBELET_HEALTHZ = "http://127.0.0.1:10248/healthz"
# Replace a file in one step: write a sibling, then rename it over the original.
WRITE_FILE = 'cat > "$1.labkit-new" && mv "$1.labkit-new" "$1"'
READY = '{.status.conditions[?(@.type=="Ready")].status}'


def kubectl(host: Host, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 60.0) -> Result:
    """Run ``kubectl ARGS`` on the machine that has the cluster's kubeconfig."""
    return host.run(["kubectl", *args], check=check, input=input, timeout=timeout)


class NodeConfig:
    """The node's sysctls (persisted in ``/etc/sysctl.d``) and its kubelet's allowlist.

    Args:
        node: the node under test (commands need root: ``SSHHost(sudo=True)``).
        kubectl: the host whose ``kubectl`` reaches the cluster (asked whether the node is Ready).
        node_name: the node's Kubernetes name.
        state: the driver's state, shared: ``originals`` (the node sysctls' values
            before the first change) and ``kubelet_backup`` (the kubelet's config was saved).
        save: writes ``state`` to its file (called after every change it records).
        ready_timeout: seconds to wait for the node to be Ready after a kubelet restart.
        poll, sleep, clock: how often and how to wait (injectable for tests).
    """

    def __init__(self, node: Host, kubectl: Host, *, node_name: str, state: dict[str, Any],
                 save: Callable[[], None], ready_timeout: float, poll: float,
                 sleep: Callable[[float], None], clock: Callable[[], float]):
        self.node = node
        self.kubectl = kubectl
        self.node_name = node_name
        self.state = state
        self._save = save
        self.ready_timeout = ready_timeout
        self.poll = poll
        self.sleep = sleep
        self.clock = clock

    def _k(self, *args: str, check: bool = True, input: str | None = None,
           timeout: float = 60.0) -> Result:
        return kubectl(self.kubectl, *args, check=check, input=input, timeout=timeout)

    # 1. node sysctls
    def apply_node_sysctls(self, wanted: dict[str, int]) -> None:
        """Set the node's sysctls (and put back the originals of the ones not wanted now)."""
        originals = self.state["originals"]
        new = [n for n in wanted if n not in originals]
        if new:
            values = self.node.run(["sysctl", "-n", *new]).stdout.splitlines()
            if len(values) != len(new):
                raise TestbedError(f"{self.node.name}: sysctl -n {' '.join(new)} printed "
                                   f"{len(values)} values for {len(new)} names")
            originals.update({n: " ".join(v.split()) for n, v in zip(new, values)})
            self._save()
        target = {n: str(v) for n, v in wanted.items()}
        target.update({n: v for n, v in originals.items() if n not in wanted})
        for name, value in target.items():
            self._sysctl_w(name, value)
        lines = ["# written by labkit for iteration settings; removed by labkit down"]
        lines += [f"{n} = {v}" for n, v in wanted.items()]
        if wanted:
            self._write(self.node, SYSCTL_FILE, "\n".join(lines) + "\n")
        else:
            self.node.run(["rm", "-f", SYSCTL_FILE])
        if target:
            names = list(target)
            seen = self.node.run(["sysctl", "-n", *names]).stdout.splitlines()
            for name, got in zip(names, seen):
                if " ".join(got.split()) != " ".join(target[name].split()):
                    raise TestbedError(f"{self.node.name}: {name} reads {got!r} after setting "
                                       f"{target[name]!r}")

    def _sysctl_w(self, name: str, value: str, host: Host | None = None) -> None:
        host = host or self.node
        r = host.run(["sysctl", "-w", f"{name}={value}"], check=False)
        if not r.ok:
            reason = (r.stderr.strip() or f"exit code {r.exit_code}").replace("sysctl: ", "")
            raise SysctlError(name, host.name, reason, value=value)

    def _write(self, host: Host, path: str, text: str) -> None:
        host.run(["sh", "-c", WRITE_FILE, "sh", path], input=text)

    # 2. kubelet
    def apply_kubelet(self, allowed: list[str]) -> None:
        """Set ``allowedUnsafeSysctls``; restart the kubelet and wait for Ready if it changed."""
        config = yaml.safe_load(self.node.run(["cat", KUBELET_CONFIG]).stdout) or {}
        if not isinstance(config, dict) or config.get("kind") != "KubeletConfiguration":
            raise TestbedError(f"{self.node.name}: {KUBELET_CONFIG} is not a KubeletConfiguration")
        if list(config.get("allowedUnsafeSysctls") or []) == allowed:
            return
        if not self.state["kubelet_backup"]:
            self.node.run(["cp", "-p", "-n", KUBELET_CONFIG, KUBELET_BACKUP])
            self.state["kubelet_backup"] = True
            self._save()
        if allowed:
            config["allowedUnsafeSysctls"] = allowed
        else:
            config.pop("allowedUnsafeSysctls", None)
        self._write(self.node, KUBELET_CONFIG, yaml.safe_dump(config, sort_keys=False))
        self.restart_kubelet()

    def restart_kubelet(self) -> None:
        """Restart the kubelet and wait until it is healthy and the node Ready."""
        self.node.run(["systemctl", "restart", "kubelet"])
        deadline = self.clock() + self.ready_timeout
        while True:
            healthy = self.node.run(["curl", "-sf", "--max-time", "5", KUBELET_HEALTHZ],
                                    check=False).ok
            if healthy:
                ready = self._k("get", "node", self.node_name, "-o", f"jsonpath={READY}",
                                check=False)
                if ready.ok and ready.stdout.strip() == "True":
                    return
            if self.clock() >= deadline:
                journal = self.node.run(["journalctl", "-u", "kubelet", "-n", "15", "--no-pager"],
                                        check=False).stdout.strip().splitlines()[-15:]
                raise TestbedError(
                    f"{self.node.name}: the kubelet is not Ready {self.ready_timeout:g} s after its "
                    f"restart (healthz {'ok' if healthy else 'failing'}); its last log lines:\n  "
                    + "\n  ".join(journal))
            self.sleep(self.poll)

    def restore(self) -> None:
        """Put back the kubelet's config (and restart it) and the node sysctls' originals; idempotent."""
        if self.state["kubelet_backup"]:
            self.node.run(["mv", KUBELET_BACKUP, KUBELET_CONFIG])
            self.state["kubelet_backup"] = False
            self._save()
            self.restart_kubelet()
        if self.state["originals"]:
            for name, value in self.state["originals"].items():
                self._sysctl_w(name, value)
            self.node.run(["rm", "-f", SYSCTL_FILE])
            self.state["originals"] = {}
