"""Apply an iteration to a real kubeadm cluster over SSH, and verify it by reading back.

:class:`KubeadmDriver` is what the ``vagrant`` and ``ssh`` testbeds share.  It
gets three hosts (any :class:`~labkit.host.Host`; :class:`~labkit.remote.SSHHost` in
use): the node under test, the host that runs ``kubectl``, and the client.  For
an iteration it does, in this order, with the commands kept simple enough to
read in a transcript:

1. node sysctls: the originals saved once, ``sysctl -w`` each value, the set
   written to ``/etc/sysctl.d/90-labkit.conf`` (a reboot keeps it), read back;
2. the kubelet's ``allowedUnsafeSysctls`` in ``/var/lib/kubelet/config.yaml``
   (original kept beside it), ``systemctl restart kubelet``, wait until the
   kubelet is healthy and the node Ready;
3. the workload: the NodePort Service applied, the Deployment applied once and
   then patched with ``kubectl patch --type=json`` (replicas, pod
   ``securityContext.sysctls``, CPU limit, conntrack tracking, pinned to the
   node), ``kubectl rollout status``; or for iteration 1 the plain server, the
   same ``in.tftpd`` as a systemd unit with the pod's CPU budget;
4. read back in every pod: its container's PID from ``crictl inspect``, the pod
   sysctls read inside its network namespace (``nsenter -t PID -n``);
5. the explicit TFTP conntrack helper rule on the node (kernels >= 6.0 attach no
   helper on their own).

Steps 1 and 2 are :class:`~labkit.testbed.node_config.NodeConfig`'s (the
driver's ``node_config``), sharing the driver's state file.

Failures raise with what was expected and what was seen: :class:`SysctlError`
(the kernel's message), :class:`PodRejected` (``SysctlForbidden``, as the kubelet
says), :class:`TestbedError` (kubelet not Ready in time, rollout stuck: with
the pods' states and the kubelet's last log lines), :class:`SSHError` (the
connection dropped: the state file says what had been applied).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from labkit.exceptions import PodRejected, SSHError, TestbedError
from labkit.host import Host, Result, sysctl_name
from labkit.manifests import SYSCTL_FORBIDDEN, Manifests, admit_sysctls, check_allowlist, dump_yaml
from labkit.testbed.base import ServedFile
# The node's files and the file-writing script live with NodeConfig; named here too, as before.
from labkit.testbed.node_config import KUBELET_CONFIG, SYSCTL_FILE, WRITE_FILE  # noqa: F401 (re-exported)
from labkit.testbed.node_config import NodeConfig, kubectl
from labkit.util import atomic_write

log = logging.getLogger(__name__)

PLAIN_UNIT = "labkit-tftp-plain"
PLAIN_DIR = "/srv/labkit-tftp"
POD_FILES = "/srv/tftp"
LIST_FILES = ('cd "$1" && for f in *; do [ -f "$f" ] || continue; '
              'printf "%s %s " "$(stat -c %s "$f")" "$f"; sha256sum < "$f" | cut -d" " -f1; done')


def parse_file_list(text: str, where: str) -> list[ServedFile]:
    """Parse ``SIZE NAME SHA256`` lines (the output of :data:`LIST_FILES`).

    Raises:
        TestbedError: a line is not of that form.
    """
    files = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit() or len(parts[2]) != 64:
            raise TestbedError(f"{where}: unexpected file listing line {line!r}")
        files.append(ServedFile(parts[1], int(parts[0]), parts[2]))
    return files


def parse_pods(text: str) -> list[dict[str, Any]]:
    """The pods of ``kubectl get pods -o json``: name, phase, ready, container id, reason.

    Pods being deleted are left out.  ``container_id`` is the runtime's id
    without its ``containerd://`` scheme (None before the container started).
    """
    doc = json.loads(text)
    pods = []
    for item in doc.get("items", []):
        meta, status = item.get("metadata", {}), item.get("status", {})
        if meta.get("deletionTimestamp"):
            continue
        containers = status.get("containerStatuses") or []
        cid = containers[0].get("containerID") if containers else None
        waiting = (containers[0].get("state") or {}).get("waiting") if containers else None
        pods.append({
            "name": meta.get("name"),
            "phase": status.get("phase"),
            "ready": bool(containers) and all(c.get("ready") for c in containers),
            "container_id": cid.split("://", 1)[-1] if cid else None,
            "reason": status.get("reason") or (waiting or {}).get("reason"),
            "message": status.get("message") or (waiting or {}).get("message") or "",
            "node": item.get("spec", {}).get("nodeName"),
            "ip": status.get("podIP"),
        })
    return sorted(pods, key=lambda p: p["name"])


class KubeadmDriver:
    """Drives one node of a kubeadm cluster through the iterations.

    Args:
        node: the node under test (commands need root: ``SSHHost(sudo=True)``).
        kubectl: the host whose ``kubectl`` reaches the cluster (the control plane).
        node_name: the node's Kubernetes name (pods are pinned to it).
        node_ip: the address clients send to.
        state_path: a local JSON file remembering what was changed (originals),
            so that :meth:`restore` undoes exactly that, also from another process.
        manifests: the ``k8s-manifests/`` to apply.
        ready_timeout, rollout_timeout: seconds to wait for the node / the rollout.
        helper_rule: add the explicit TFTP conntrack helper rule (without it,
            transfers through the NodePort fail on kernels >= 6.0).
        sleep, clock: injectable for tests.
    """

    def __init__(self, node: Host, kubectl: Host, *, node_name: str, node_ip: str,
                 state_path: str | os.PathLike, manifests: Manifests | None = None,
                 ready_timeout: float = 120.0, rollout_timeout: float = 180.0,
                 helper_rule: bool = True, poll: float = 2.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.kubectl = kubectl
        self.node_name = node_name
        self.node_ip = node_ip
        self.state_path = Path(state_path)
        self.manifests = manifests or Manifests()
        self.ready_timeout = ready_timeout
        self.rollout_timeout = rollout_timeout
        self.use_helper_rule = helper_rule
        self.poll = poll
        self.sleep = sleep
        self.clock = clock
        self.template = self.manifests.pod_template()
        self.port = self.manifests.service_port()
        self.state = self._load()
        self.node_config = NodeConfig(node, kubectl, node_name=node_name, state=self.state, save=self._save,
                                      ready_timeout=ready_timeout, poll=poll, sleep=sleep, clock=clock)

    # --- state -----------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"originals": {}, "kubelet_backup": False, "helper_rule": False,
                    "plain": False, "workload": False, "pods": [], "file": None, "iteration": None}
        except (OSError, ValueError) as exc:
            raise TestbedError(f"cannot read the testbed state {self.state_path}: {exc}") from None

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, json.dumps(self.state, indent=1).encode())

    def _k(self, *args: str, check: bool = True, input: str | None = None,
           timeout: float = 60.0) -> Result:
        return kubectl(self.kubectl, *args, check=check, input=input, timeout=timeout)

    # --- the iteration ---------------------------------------------------------------

    def apply(self, iteration) -> None:
        """Bring the node and the workload to ``iteration``, verifying every change.

        Raises:
            PodRejected: the pod sysctls are not allowed (checked before any change,
                and again from the kubelet's own verdict).
            SysctlError: the kernel refused a node sysctl.
            TestbedError: kubelet not Ready in time, rollout stuck, a value read
                back differs, the served file is not the expected size.
            SSHError, CommandFailed: a host could not be reached or a command failed.
        """
        allowed = check_allowlist(iteration.allowed_unsafe_sysctls)
        if iteration.setup == "nodeport":
            admit_sysctls(f"{self.template.deployment}-*", iteration.pod_sysctls, allowed)
        try:
            self._apply(iteration, allowed)
        except SSHError as exc:
            raise SSHError(f"{exc}\n  what was applied so far is recorded in {self.state_path}; "
                           "`labkit down` undoes it once the host answers again") from exc

    def _apply(self, iteration, allowed: tuple[str, ...]) -> None:
        self.node_config.apply_node_sysctls({sysctl_name(k): v for k, v in iteration.node_sysctls.items()})
        self.node_config.apply_kubelet(list(allowed))
        if iteration.setup == "plain":
            self.scale_down()
            self.start_plain(iteration)
        else:
            self.stop_plain()
            if self.use_helper_rule:
                self.ensure_helper_rule()
            self.apply_workload(iteration)
            self.verify_pods(iteration)
        size = self.state["file"]["size"]
        if size != iteration.file_size:
            raise TestbedError(
                f"{self.node.name}: the served file has {size} bytes, the profile wants "
                f"{iteration.file_size}; rebuild the image with FILE_SIZE={iteration.file_size} "
                "(vagrant/settings.yaml: file_size, then vagrant provision)")
        self.state["iteration"] = iteration.to_dict()
        self._save()

    # 1. node sysctls and 2. kubelet: see NodeConfig
    # 3. workload
    def deployment_doc(self, iteration) -> dict[str, Any]:
        """The Deployment for ``iteration``, pinned to the node under test."""
        doc = self.manifests.deployment_for(iteration)
        doc["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": self.node_name}
        return doc

    def patch_ops(self, iteration) -> list[dict[str, Any]]:
        """The JSON patch that turns the running Deployment into ``iteration``'s."""
        pod = self.deployment_doc(iteration)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        base = "/spec/template/spec"
        return [
            {"op": "replace", "path": "/spec/replicas", "value": iteration.replicas},
            {"op": "add", "path": f"{base}/securityContext", "value": pod["securityContext"]},
            {"op": "add", "path": f"{base}/nodeSelector", "value": pod["nodeSelector"]},
            {"op": "add", "path": f"{base}/containers/0/resources", "value": container["resources"]},
            {"op": "add", "path": f"{base}/containers/0/env", "value": container["env"]},
        ]

    def apply_workload(self, iteration) -> None:
        """Apply the Service, create or patch the Deployment, wait for the rollout."""
        name, ns = self.template.deployment, self.template.namespace
        self._k("apply", "-f", "-", input=dump_yaml(self.manifests.service))
        exists = self._k("get", "deployment", name, "-n", ns, "-o", "name", check=False).ok
        if exists:
            self._k("patch", "deployment", name, "-n", ns, "--type=json", "-p",
                    json.dumps(self.patch_ops(iteration), separators=(",", ":")))
        else:
            self._k("apply", "-f", "-", input=dump_yaml(self.deployment_doc(iteration)))
        self.state["workload"] = True
        self._save()
        timeout = f"--timeout={int(self.rollout_timeout)}s"
        r = self._k("rollout", "status", f"deployment/{name}", "-n", ns, timeout, check=False,
                    timeout=self.rollout_timeout + 30)
        if not r.ok:
            raise self._rollout_error(r, iteration)

    def _pods(self) -> list[dict[str, Any]]:
        r = self._k("get", "pods", "-n", self.template.namespace, "-l", self._selector(), "-o", "json")
        try:
            return parse_pods(r.stdout)
        except (ValueError, AttributeError) as exc:
            raise TestbedError(f"{self.kubectl.name}: kubectl get pods printed no pod list: {exc}") from None

    def _selector(self) -> str:
        labels = self.manifests.deployment["spec"]["selector"]["matchLabels"]
        return ",".join(f"{k}={v}" for k, v in labels.items())

    def _rollout_error(self, result: Result, iteration) -> Exception:
        pods = self._pods()
        for pod in pods:
            if pod["reason"] == SYSCTL_FORBIDDEN:
                return PodRejected(pod["name"], SYSCTL_FORBIDDEN, pod["message"] or "forbidden sysctl")
        states = "; ".join(f"{p['name']}: {p['phase']}" + (f" ({p['reason']}: {p['message']})"
                                                             if p["reason"] else "")
                           for p in pods) or "no pods"
        said = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        return TestbedError(
            f"rollout of deployment/{self.template.deployment} to {iteration.replicas} replica(s) "
            f"did not finish within {self.rollout_timeout:g} s ({said[0]}); pods: {states}")

    def scale_down(self) -> None:
        """Scale the Deployment to 0 (iteration 1 has no pods) and wait."""
        if not self.state["workload"]:
            return
        name, ns = self.template.deployment, self.template.namespace
        self._k("scale", "deployment", name, "-n", ns, "--replicas=0")
        self._k("rollout", "status", f"deployment/{name}", "-n", ns,
                f"--timeout={int(self.rollout_timeout)}s", timeout=self.rollout_timeout + 30)
        self.state["pods"] = []
        self._save()

    def start_plain(self, iteration) -> None:
        """Run the server as a plain process on the node (a systemd unit with the pod's CPU budget)."""
        if not self.state["plain"]:
            self.node.run(["sh", "-c", f'mkdir -p "$1" && [ -s "$1/file-{iteration.file_size}.bin" ] || '
                           f'head -c {iteration.file_size} /dev/urandom > "$1/file-{iteration.file_size}.bin"',
                           "sh", PLAIN_DIR])
            argv = ["systemd-run", f"--unit={PLAIN_UNIT}", "--collect"]
            if iteration.cpu_limit:
                argv.append(f"--property=CPUQuota={round(iteration.cpu_limit * 100)}%")
            args = [PLAIN_DIR if a == POD_FILES else a for a in self.template.args]
            if "--address" in args:  # the pod listens on all its addresses; the node on one
                args[args.index("--address") + 1] = f"{self.node_ip}:{self.template.container_port}"
            self.node.run([*argv, *args])
            self.state["plain"] = True
            self._save()
        active = self.node.run(["systemctl", "is-active", PLAIN_UNIT], check=False)
        if active.stdout.strip() != "active":
            raise TestbedError(f"{self.node.name}: the plain TFTP server ({PLAIN_UNIT}) is "
                               f"{active.stdout.strip() or 'not running'}")
        files = parse_file_list(self.node.run(["sh", "-c", LIST_FILES, "sh", PLAIN_DIR]).stdout,
                                self.node.name)
        self.state["file"] = _one_file(files, self.node.name, PLAIN_DIR)

    def stop_plain(self) -> None:
        """Stop the plain server if this driver started it."""
        if self.state["plain"]:
            self.node.run(["systemctl", "stop", PLAIN_UNIT], check=False)
            self.state["plain"] = False
            self._save()

    # 4. read back in the pods
    def verify_pods(self, iteration) -> None:
        """Check the pods: count, Running, and each pod sysctl read inside its namespace."""
        pods = [p for p in self._pods() if p["phase"] == "Running" and p["ready"]]
        if len(pods) != iteration.replicas:
            raise TestbedError(f"expected {iteration.replicas} running pod(s) of "
                               f"deployment/{self.template.deployment}, found {len(pods)}")
        wanted = {sysctl_name(k): str(v) for k, v in iteration.pod_sysctls.items()}
        for pod in pods:
            r = self.node.run(["crictl", "inspect", "--output", "go-template", "--template",
                               "{{.info.pid}}", pod["container_id"]])
            pid = r.stdout.strip()
            if not pid.isdigit() or pid == "0":
                raise TestbedError(f"{self.node.name}: no process for pod {pod['name']} "
                                   f"(crictl inspect printed {pid!r})")
            pod["pid"] = int(pid)
            if wanted:
                seen = self.node.run(["nsenter", "-t", pid, "-n", "sysctl", "-n", *wanted]
                                     ).stdout.splitlines()
                for (name, value), got in zip(wanted.items(), seen):
                    if got.strip() != value:
                        raise TestbedError(f"pod {pod['name']}: {name} reads {got.strip()!r} "
                                           f"inside the pod, expected {value!r}")
        self.state["pods"] = pods
        files = parse_file_list(self.node.run(["sh", "-c", LIST_FILES, "sh",
                                               f"/proc/{pods[0]['pid']}/root{POD_FILES}"]).stdout,
                                pods[0]["name"])
        self.state["file"] = _one_file(files, pods[0]["name"], POD_FILES)
        self._save()

    # 5. the helper rule
    def helper_rule(self) -> list[str]:
        """The raw-table rule that attaches the TFTP helper to the NodePort's traffic."""
        return ["PREROUTING", "-p", "udp", "--dport", str(self.port.node_port), "-j", "CT",
                "--helper", "tftp"]

    def ensure_helper_rule(self) -> None:
        """Add the helper rule on the node unless it is there."""
        if not self.node.run(["iptables", "-t", "raw", "-C", *self.helper_rule()], check=False).ok:
            self.node.run(["iptables", "-t", "raw", "-A", *self.helper_rule()])
            self.state["helper_rule"] = True
            self._save()

    # --- undo ------------------------------------------------------------------------

    def restore(self) -> None:
        """Undo what the state file says was changed; idempotent."""
        ns = self.template.namespace
        if self.state["plain"]:
            self.stop_plain()
        if self.state["workload"]:
            self._k("delete", "deployment", self.template.deployment, "-n", ns, "--ignore-not-found",
                    "--wait=true", timeout=self.rollout_timeout)
            self._k("delete", "service", self.port.name, "-n", ns, "--ignore-not-found")
            self.state.update(workload=False, pods=[])
            self._save()
        if self.state["helper_rule"]:
            self.node.run(["iptables", "-t", "raw", "-D", *self.helper_rule()], check=False)
            self.state["helper_rule"] = False
            self._save()
        self.node_config.restore()
        self.state.update(file=None, iteration=None)
        self._save()
        self.state_path.unlink(missing_ok=True)

    @property
    def pods(self) -> list[dict[str, Any]]:
        """The verified pods of the last apply (name, ip, pid, container id)."""
        return list(self.state["pods"])

    @property
    def file(self) -> ServedFile | None:
        """The served file, once applied."""
        f = self.state.get("file")
        return ServedFile(**f) if f else None


def _one_file(files: list[ServedFile], where: str, directory: str) -> dict[str, Any]:
    if len(files) != 1:
        raise TestbedError(f"{where}: expected one served file in {directory}, found "
                           f"{', '.join(f.name for f in files) or 'none'}")
    f = files[0]
    return {"name": f.name, "size": f.size, "sha256": f.sha256}
