"""Hosts for testing the kubeadm driver without a cluster.

``ReplayHost`` replays a recorded transcript strictly: each command must be the
next one recorded (host, argv, stdin), else the test fails showing both; the
recorded answer is returned.  ``FakeCluster`` answers the same commands the
way a one-worker kubeadm cluster would (kubelet config, sysctls, Deployment,
pods, crictl, iptables), with faults on request; it is what (re)records the
transcripts (``LABKIT_RECORD_TRANSCRIPTS=1``) and what the failure tests drive.
Its outputs follow what kubectl 1.31, crictl 1.31, procps sysctl and iptables
1.8 print.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from labkit.exceptions import SSHError
from labkit.host import Host, Result, command_text
from labkit.testbed import kubeadm as K

DATA = Path(__file__).parent / "data" / "kubeadm"
KUBELET_CONFIG_TEXT = (DATA / "kubelet-config.yaml").read_text()
DEFAULTS = {
    "net.netfilter.nf_conntrack_max": "262144",
    "net.netfilter.nf_conntrack_expect_max": "4096",
    "net.netfilter.nf_conntrack_udp_timeout": "30",
    "net.netfilter.nf_conntrack_udp_timeout_stream": "120",
}
FILE_SHA = hashlib.sha256(b"labkit").hexdigest()


class ReplayHost(Host):
    """A host that answers from a shared transcript, in order, strictly."""

    def __init__(self, name: str, transcript: "Transcript"):
        self.name = name
        self.transcript = transcript

    def _run(self, cmd, *, timeout, input, env) -> Result:
        return self.transcript.next(self.name, cmd, input)

    def read_file(self, path: str) -> bytes:
        raise AssertionError(f"the driver must run commands, not read {path} directly")

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        raise AssertionError(f"the driver must run commands, not write {path} directly")


class Transcript:
    """Recorded steps: ``{host, cmd, input?, exit, stdout, stderr}``."""

    def __init__(self, steps: list[dict[str, Any]]):
        self.steps = steps
        self.pos = 0

    @classmethod
    def load(cls, path: Path) -> "Transcript":
        return cls(yaml.safe_load(path.read_text())["steps"])

    def next(self, host: str, cmd: Any, input: Any) -> Result:
        got = {"host": host, "cmd": _cmd(cmd)}
        if input is not None:
            got["input"] = input
        if self.pos >= len(self.steps):
            raise AssertionError(f"step {self.pos + 1}: unexpected command after the transcript "
                                 f"ended: {got}")
        step = self.steps[self.pos]
        want = {k: step[k] for k in ("host", "cmd", "input") if k in step}
        assert got == want, f"step {self.pos + 1}: expected {want}\n  got {got}"
        self.pos += 1
        if step.get("drop"):
            raise SSHError(f"{host}: SSH connection lost while running {command_text(cmd)!r}; "
                           "the command may or may not have completed")
        return Result(command_text(cmd), host, step.get("exit", 0), step.get("stdout", ""),
                      step.get("stderr", ""), 0.01)

    @property
    def done(self) -> bool:
        return self.pos == len(self.steps)


def _cmd(cmd: Any) -> Any:
    return cmd if isinstance(cmd, str) else [str(c) for c in cmd]


class SimHost(Host):
    """A host of :class:`FakeCluster`; every call is recorded."""

    def __init__(self, name: str, cluster: "FakeCluster"):
        self.name = name
        self.cluster = cluster

    def _run(self, cmd, *, timeout, input, env) -> Result:
        return self.cluster.handle(self.name, _cmd(cmd), input)

    def read_file(self, path: str) -> bytes:
        raise AssertionError(f"the driver must run commands, not read {path} directly")

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        raise AssertionError(f"the driver must run commands, not write {path} directly")


class FakeCluster:
    """A one-worker kubeadm cluster as its commands see it.

    Faults: ``refuse`` {sysctl name: kernel message}, ``never_ready`` (the
    kubelet fails after a restart), ``stale_kubelet`` (a restart does not take the
    new configuration), ``stuck`` (the rollout never finishes),
    ``drop_at`` (the n-th command loses the connection).
    """

    def __init__(self, node: str = "worker-1", control: str = "control-plane", **faults: Any):
        self.node_name, self.control_name = node, control
        self.faults = faults
        self.steps: list[dict[str, Any]] = []
        self.sysctls = dict(DEFAULTS)
        self.files = {K.KUBELET_CONFIG: KUBELET_CONFIG_TEXT}
        self.kubelet_allowed: list[str] = []
        self.kubelet_ok = True
        self.deployment: dict[str, Any] | None = None
        self.service = False
        self.pods: list[dict[str, Any]] = []
        self.generation = 0
        self.raw_rules: list[list[str]] = []
        self.plain = "inactive"
        self.next_pid = 4242

    def host(self, role: str) -> SimHost:
        return SimHost(self.node_name if role == "node" else self.control_name, self)

    def handle(self, host: str, cmd: Any, input: Any) -> Result:
        step: dict[str, Any] = {"host": host, "cmd": cmd}
        if input is not None:
            step["input"] = input
        self.steps.append(step)
        if self.faults.get("drop_at") == len(self.steps):
            step["drop"] = True
            raise SSHError(f"{host}: SSH connection lost while running {command_text(cmd)!r}; "
                           "the command may or may not have completed")
        code, out, err = self._answer(host, cmd, input)
        step.update({"exit": code, "stdout": out, "stderr": err})
        return Result(command_text(cmd), host, code, out, err, 0.01)

    def transcript(self) -> dict[str, Any]:
        return {"steps": copy.deepcopy(self.steps)}

    # --- answers ---------------------------------------------------------------------

    def _answer(self, host: str, cmd: list[str], input: Any) -> tuple[int, str, str]:
        if cmd[0] == "kubectl":
            assert host == self.control_name, f"kubectl must run on the control plane, not {host}"
            return self._kubectl(cmd[1:], input)
        assert host == self.node_name, f"unexpected command on {host}: {cmd}"
        if cmd[:2] == ["sysctl", "-n"]:
            return self._read(self.sysctls, cmd[2:])
        if cmd[:2] == ["sysctl", "-w"]:
            name, value = cmd[2].split("=", 1)
            if name in self.faults.get("refuse", {}):
                return 255, "", f'sysctl: setting key "{name}": {self.faults["refuse"][name]}\n'
            self.sysctls[name] = value
            return 0, f"{name} = {value}\n", ""
        if cmd[:2] == ["sh", "-c"]:
            return self._sh(cmd[2], cmd[4:], input)
        if cmd[:2] == ["rm", "-f"]:
            self.files.pop(cmd[2], None)
            return 0, "", ""
        if cmd[0] == "cat":
            if cmd[1] not in self.files:
                return 1, "", f"cat: {cmd[1]}: No such file or directory\n"
            return 0, self.files[cmd[1]], ""
        if cmd[0] == "cp":
            self.files.setdefault(cmd[-1], self.files[cmd[-2]])
            return 0, "", ""
        if cmd[0] == "mv":
            self.files[cmd[2]] = self.files.pop(cmd[1])
            return 0, "", ""
        if cmd[:3] == ["systemctl", "restart", "kubelet"]:
            config = yaml.safe_load(self.files[K.KUBELET_CONFIG])
            if not self.faults.get("stale_kubelet"):
                self.kubelet_allowed = list(config.get("allowedUnsafeSysctls") or [])
            self.kubelet_ok = not self.faults.get("never_ready")
            return 0, "", ""
        if cmd[0] == "curl":
            return (0, "ok", "") if self.kubelet_ok else (7, "", "")
        if cmd[0] == "journalctl":
            return 0, ("Nov 26 11:02:01 worker-1 kubelet[5123]: E1126 11:02:01.412 run.go:72] "
                       '"command failed" err="failed to validate kubelet configuration"\n'), ""
        if cmd[0] == "systemd-run":
            self.plain = "active"
            return 0, "", f"Running as unit: {K.PLAIN_UNIT}.service; invocation ID: 5d0c\n"
        if cmd[:2] == ["systemctl", "is-active"]:
            return (0 if self.plain == "active" else 3), self.plain + "\n", ""
        if cmd[:2] == ["systemctl", "stop"]:
            self.plain = "inactive"
            return 0, "", ""
        if cmd[:3] == ["iptables", "-t", "raw"]:
            return self._iptables(cmd[3], cmd[4:])
        if cmd[:2] == ["crictl", "inspect"]:
            pod = next(p for p in self.pods if p["cid"] == cmd[-1])
            return 0, f"{pod['pid']}\n", ""
        if cmd[0] == "nsenter":
            pod = next(p for p in self.pods if str(p["pid"]) == cmd[2])
            return self._read({**DEFAULTS, **pod["sysctls"]}, cmd[6:])
        raise AssertionError(f"FakeCluster does not know {cmd}")

    def _read(self, values: dict[str, str], names: list[str]) -> tuple[int, str, str]:
        for n in names:
            if n not in values:
                path = "/proc/sys/" + n.replace(".", "/")
                return 255, "", f"sysctl: cannot stat {path}: No such file or directory\n"
        return 0, "".join(values[n] + "\n" for n in names), ""

    def _sh(self, script: str, args: list[str], input: Any) -> tuple[int, str, str]:
        if script == K.WRITE_FILE:
            self.files[args[0]] = input
            return 0, "", ""
        if script == K.LIST_FILES:
            return 0, f"5120 file-5120.bin {FILE_SHA}\n", ""
        if script.startswith("mkdir -p"):
            return 0, "", ""
        raise AssertionError(f"FakeCluster does not know the script {script!r}")

    def _iptables(self, op: str, rule: list[str]) -> tuple[int, str, str]:
        if op == "-C":
            if rule in self.raw_rules:
                return 0, "", ""
            return 1, "", "iptables: Bad rule (does a matching rule exist in that chain?).\n"
        if op == "-A":
            self.raw_rules.append(rule)
        elif op == "-D":
            self.raw_rules.remove(rule)
        return 0, "", ""

    # --- kubectl ---------------------------------------------------------------------

    def _kubectl(self, args: list[str], input: Any) -> tuple[int, str, str]:
        if args[:3] == ["apply", "-f", "-"]:
            doc = yaml.safe_load(input)
            if doc["kind"] == "Service":
                verb = "configured" if self.service else "created"
                self.service = True
                return 0, f"service/{doc['metadata']['name']} {verb}\n", ""
            self.deployment = doc
            self.generation += 1
            return 0, f"deployment.apps/{doc['metadata']['name']} created\n", ""
        if args[:2] == ["get", "deployment"]:
            if self.deployment is None:
                return 1, "", f'Error from server (NotFound): deployments.apps "{args[2]}" not found\n'
            return 0, f"deployment.apps/{args[2]}\n", ""
        if args[0] == "patch":
            for op in json.loads(args[args.index("-p") + 1]):
                _json_patch(self.deployment, op)
            self.generation += 1
            return 0, f"deployment.apps/{args[2]} patched\n", ""
        if args[0] == "scale":
            self.deployment["spec"]["replicas"] = int(args[-1].split("=")[1])
            return 0, f"deployment.apps/{args[2]} scaled\n", ""
        if args[:2] == ["rollout", "status"]:
            return self._rollout()
        if args[:2] == ["get", "pods"]:
            return 0, json.dumps({"apiVersion": "v1", "kind": "List", "items": [
                _pod_json(p, self.node_name) for p in self.pods]}, indent=4) + "\n", ""
        if args[:2] == ["get", "node"]:
            return 0, "True" if self.kubelet_ok else "False", ""
        if args[:2] == ["delete", "deployment"]:
            self.deployment, self.pods = None, []
            return 0, f'deployment.apps "{args[2]}" deleted\n', ""
        if args[:2] == ["delete", "service"]:
            self.service = False
            return 0, f'service "{args[2]}" deleted\n', ""
        raise AssertionError(f"FakeCluster does not know kubectl {args}")

    def _rollout(self) -> tuple[int, str, str]:
        spec = self.deployment["spec"]
        pod_spec = spec["template"]["spec"]
        sysctls = {s["name"]: s["value"] for s in pod_spec.get("securityContext", {}).get("sysctls", [])}
        forbidden = [n for n in sysctls if not any(
            n == p or (p.endswith("*") and n.startswith(p[:-1])) for p in self.kubelet_allowed)]
        template_hash = hashlib.sha1(json.dumps(spec["template"], sort_keys=True).encode()).hexdigest()[:10]
        self.pods = []
        for i in range(spec["replicas"]):
            name = f"tftp-server-{template_hash}-{'abcdefghij'[i]}x{self.generation}q"
            pod = {"name": name, "cid": hashlib.sha256(name.encode()).hexdigest(), "pid": self.next_pid,
                   "sysctls": sysctls, "ip": f"10.244.1.{10 + i}", "forbidden": forbidden}
            self.next_pid += 17
            self.pods.append(pod)
        if (forbidden and spec["replicas"]) or self.faults.get("stuck"):
            return 1, ("Waiting for deployment \"tftp-server\" rollout to finish: 0 of "
                       f"{spec['replicas']} updated replicas are available...\n"), \
                "error: timed out waiting for the condition\n"
        return 0, (f"Waiting for deployment \"tftp-server\" rollout to finish: 0 of {spec['replicas']} "
                   "updated replicas are available...\n"
                   'deployment "tftp-server" successfully rolled out\n'), ""


def _json_patch(doc: dict, op: dict) -> None:
    parts = [p for p in op["path"].split("/") if p]
    node: Any = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key = int(parts[-1]) if isinstance(node, list) else parts[-1]
    if op["op"] == "replace":
        assert key in node or isinstance(node, list), f"replace of a missing {op['path']}"
    node[key] = op["value"]


def _pod_json(pod: dict[str, Any], node: str) -> dict[str, Any]:
    status: dict[str, Any]
    if pod["forbidden"]:
        status = {"phase": "Failed", "reason": "SysctlForbidden",
                  "message": f"Pod forbidden sysctl: \"{pod['forbidden'][0]}\" not allowlisted"}
    else:
        status = {"phase": "Running", "podIP": pod["ip"], "containerStatuses": [{
            "name": "tftp-server", "ready": True, "restartCount": 0,
            "containerID": f"containerd://{pod['cid']}",
            "image": "localhost/labkit/tftp-server:latest",
            "state": {"running": {"startedAt": "2026-11-26T11:02:03Z"}}}]}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod["name"], "namespace": "default", "labels": {"app": "tftp-server"}},
            "spec": {"nodeName": node}, "status": status}


def clock() -> tuple[Any, Any]:
    """A fake clock and sleep: sleeping advances the clock, no real waiting."""
    now = [1000.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    return (lambda: now[0]), sleep


__all__ = ["ReplayHost", "Transcript", "FakeCluster", "clock", "time"]
