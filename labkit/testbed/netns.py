"""The embedded testbed: a Kubernetes-shaped node in network namespaces of one Linux machine.

Namespaces: ``lk<run>-client`` (the measurement tool's host), ``lk<run>-node``,
and ``lk<run>-pod<k>`` per pod replica.  The client reaches the node over its
own veth pair; the pods hang off a bridge in the node, as with a CNI bridge.
Nothing links the lab to the machine's own namespace.  The node gets
kube-proxy's iptables rules rendered from ``k8s-manifests/`` (plus the explicit
TFTP helper rule), each pod runs a real ``in.tftpd`` under its CPU limit
(a cgroup), and the iteration's sysctls are applied the Kubernetes way: global
ones in the machine's namespace through :class:`~labkit.sysctls.GlobalSysctls`,
namespaced node ones in the node, pod ones after kubelet-style admission.

What a lab is made of is data (:mod:`labkit.testbed.topology`); the backend
that makes it is :mod:`labkit.testbed.netns_apply`; the run's state is typed
(:mod:`labkit.testbed.runstate`).  The machine is a :class:`~labkit.host.Host`:
this one (:class:`~labkit.host.LocalHost`, the default) or another reached over
SSH (``NetnsTestbed(host=SSHHost(...))``); the run's state, ledger, servers and
cgroups all live on it.  Every resource is written to the run's
:class:`~labkit.ledger.Ledger` before it is made; ``down`` and :func:`clean`
undo exactly what the ledgers list.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from labkit.cleanup import OWNER_NAME, clean_folder, clean_strict as clean, owner_record
from labkit.exceptions import GlobalSysctlsHeld, TestbedError
from labkit.host import Host, LocalHost
from labkit.ledger import Ledger
from labkit.manifests import Manifests, admit_sysctls, check_allowlist
from labkit.signals import Interrupts, signals_deferred
from labkit.sysctls import state_dir as default_state_dir
from labkit.testbed.base import NodeMachine, ServedFile, Testbed
from labkit.testbed.netns_apply import Builder, NodeRules, template_hash
from labkit.testbed.runstate import (RUN_DIR_PREFIX, STATE_NAME, RunState, new_run_id, parse_state, read_state,
                                     run_dirs, state_lock, status_document)
from labkit.testbed.topology import (CLIENT_IP, CLUSTER_IP, LINK_PREFIX, NODE_IP, POD_GATEWAY, POD_NET,
                                     link_name)

log = logging.getLogger(__name__)

__all__ = ["CLIENT_IP", "CLUSTER_IP", "LINK_PREFIX", "NODE_IP", "POD_GATEWAY", "POD_NET", "NetnsTestbed",
           "clean", "link_name", "new_run_id", "read_state", "run_dirs", "signals_deferred", "state_lock"]

_here = LocalHost("init")


class NetnsTestbed(Testbed):
    """The netns testbed of one state directory (one run at a time) on one machine.

    Args:
        state_dir: where the run's ledger and state live on the machine
            ($LABKIT_STATE_DIR or /run/labkit).
        manifests_dir: the ``k8s-manifests/`` directory to read (here).
        helper_rule: add the explicit TFTP conntrack helper rule (a test switch: without
            it, fetches through the NodePort fail on kernels since 6.0).  None keeps the
            running testbed's choice (True for a new one).
        global_wait: seconds to wait while another lab run holds the global sysctls.
        host: the machine (default this one, :class:`~labkit.host.LocalHost`); e.g. an
            :class:`~labkit.remote.SSHHost` logged in as root on a Linux machine.
        python: the interpreter on the machine that runs the loadgen (default: this
            one here; on another machine, labkit's own source copied there on first use
            by :func:`~labkit.remote.deploy.deploy_labkit`); labkit must be importable by it.
        on: the machine as ``--on`` names it (``vagrant:lab``, an inventory host,
            ``[user@]host[:port]``; see :mod:`labkit.remote.targets`), instead of ``host``;
            ``inventory`` is the file for host names.
    """

    name = "netns"

    def __init__(self, *, state_dir: str | os.PathLike | None = None,
                 manifests_dir: str | os.PathLike | None = None, helper_rule: bool | None = None,
                 global_wait: float = 0.0, host: Host | None = None, python: str | None = None,
                 on: str | None = None, inventory: str | os.PathLike | None = None):
        from labkit.remote.targets import the_machine

        self.on, self.machine = on, the_machine(host, on, inventory)
        self._python = python or (sys.executable if self.machine.is_local else None)
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.manifests = Manifests(manifests_dir)
        self.global_wait = global_wait
        self.helper_option = helper_rule
        self.state: RunState | None = None
        self.interrupts = Interrupts()
        self.rules = NodeRules(self)
        self.run_id: str | None = None
        self._load()

    @property
    def python(self) -> str:
        """The interpreter that runs labkit's Python parts on the machine (copied there on first use)."""
        if self._python is None:
            from labkit.remote.deploy import deploy_labkit

            self._python = deploy_labkit(self.machine)
        return self._python

    @python.setter
    def python(self, value: str) -> None:
        self._python = value

    def _load(self) -> None:
        """Attach to the run recorded in the state directory (the newest), if any."""
        self.run_id, self.state = None, None
        for run in reversed(run_dirs(self.state_dir, self.machine)):
            try:
                data = self.machine.read_file(str(run / STATE_NAME))
            except FileNotFoundError:
                continue
            self.run_id = run.name[len(RUN_DIR_PREFIX):]
            self.state = parse_state(data, run / STATE_NAME)
            break

    # --- names and state ---------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """The run's state directory (on the machine)."""
        if not self.run_id:
            raise TestbedError("the netns testbed is down (no run); `labkit up` first")
        return self.state_dir / f"{RUN_DIR_PREFIX}{self.run_id}"

    @property
    def ledger(self) -> Ledger:
        """The run's ledger (each record is a safe point for a pending SIGINT/SIGTERM)."""
        return Ledger(self.run_dir, before_record=self.interrupts.check, host=self.machine)

    def ns(self, what: str) -> str:
        """The namespace name of ``client``, ``node`` or ``pod<k>`` in this run."""
        return f"lk{self.run_id}-{what}"

    def save(self) -> None:
        """Write the run's ``state.json`` (atomically)."""
        assert self.state is not None
        self.state.updated = time.time()
        self.machine.atomic_write(self.run_dir / STATE_NAME, json.dumps(self.state.to_dict(), indent=1).encode())

    # --- up ---------------------------------------------------------------------------

    def up(self, iteration) -> None:
        """Build the testbed for ``iteration`` or reconfigure the running one.

        Pod sysctls are admitted first: a refused pod raises
        :class:`~labkit.exceptions.PodRejected` before anything changes.  Any other
        failure, SIGINT or SIGTERM removes everything the run made and re-raises.

        Raises:
            PodRejected: a pod sysctl is forbidden (``SysctlForbidden``).
            TestbedError: the kubelet allowlist is invalid, or building failed.
        """
        template = self.manifests.pod_template_for(iteration)
        check_allowlist(iteration.allowed_unsafe_sysctls)
        if iteration.setup == "nodeport":
            pod_name = f"{template.deployment}-{template_hash(template, '')[:10]}-xxxxx"
            admit_sysctls(pod_name, template.sysctls, iteration.allowed_unsafe_sysctls)
        from labkit.loadguard import refuse_during_load

        with state_lock(self.state_dir, self.machine):
            self._load()
            if self.state is not None:
                refuse_during_load(self, "reconfigure the testbed")
            if self.state is not None and self.state.state != "up":
                raise TestbedError(
                    f"netns run {self.run_id} did not finish being built or taken down (a crash?); "
                    "run `labkit clean` first")
            self._up_locked(iteration, template)

    def _up_locked(self, iteration, template) -> None:
        started = time.monotonic()
        fresh = self.state is None
        builder = Builder(self)
        try:
            with self.interrupts.deferred():
                if fresh:
                    self.run_id = new_run_id(self.machine)
                    helper = True if self.helper_option is None else self.helper_option
                    self.state = RunState(self.run_id, created=time.time(), helper_rule=helper)
                    builder.build_base()
                if self.helper_option is not None and not self.state.rules_applied:
                    self.state.helper_rule = self.helper_option
                self.state.state = "building"
                self.save()
                builder.ensure_file(iteration.file_size)
                builder.apply_globals(iteration.global_sysctls)
                builder.apply_node_sysctls(iteration.namespaced_node_sysctls)
                if iteration.setup == "plain":
                    builder.apply_plain(template, iteration)
                else:
                    builder.apply_pods(template, iteration)
                took = time.monotonic() - started
                self.state.state, self.state.iteration = "up", iteration.to_dict()
                self.state.last_up = {"seconds": round(took, 3), "waited_for_globals_s": round(builder.waited, 3)}
                self.save()
                # the process that configured it last uses it: `labkit clean` leaves it alone while
                # that process lives (a notebook's kernel), and removes it once it is gone
                self.machine.atomic_write(self.run_dir / OWNER_NAME, json.dumps(owner_record()).encode())
        except GlobalSysctlsHeld:
            if fresh:
                self._down_locked()
            else:  # nothing was changed yet: the running testbed stays as it was
                for e in self.ledger.entries():
                    if e["kind"] == "global-sysctls" and not self.state.globals:
                        self.ledger.remove(e)
                self.state.state = "up"
                self.save()
            raise
        except BaseException:
            log.error("up failed; removing what this run made")
            self._down_locked()
            raise
        log.info("netns testbed %s up for iteration %s in %.2f s", self.run_id, iteration.number,
                 time.monotonic() - started)

    # --- down, status, hosts -------------------------------------------------------------

    def down(self, *, force: bool = False) -> None:
        """Remove everything the run's ledger lists, in reverse order; restore the globals.

        Idempotent: nothing to do when the testbed is down.

        Args:
            force: stop a load another process runs on the testbed first (its
                iteration then fails); without it such a load makes ``down`` refuse.

        Raises:
            LoadUnderWay: another process runs a load on it (and not ``force``).
            StateCorrupt: the run's ledger is damaged (nothing was removed; `labkit clean` salvages).
            TestbedError: something could not be removed (the rest was; `labkit clean` retries).
        """
        from labkit.loadguard import refuse_during_load

        if not self.machine.exists(self.state_dir):
            self.state, self.run_id = None, None
            return
        with state_lock(self.state_dir, self.machine):
            if self.run_id and not self.machine.exists(self.run_dir / STATE_NAME):
                self._load()  # taken down by another process meanwhile
            if self.run_id:
                refuse_during_load(self, "take the testbed down", force=force)
            self._down_locked()

    def _down_locked(self) -> None:
        if not self.run_id:
            return
        with signals_deferred():
            _discard_run(self.run_dir, self.machine)
        log.info("netns testbed %s down", self.run_id)
        self.state, self.run_id = None, None

    def _require(self) -> RunState:
        if self.state is None or self.state.state != "up":
            raise TestbedError("the netns testbed is not up; run `labkit up` first")
        return self.state

    def roles(self) -> list[str]:
        """``init``, ``node``, ``pod-1``.. and ``client`` (empty when down)."""
        if self.state is None:
            return []
        return ["init", "node", *(f"pod-{i}" for i in range(1, len(self.state.pods) + 1)), "client"]

    def pods(self) -> list:
        """The pods in order of their serial (pod-1 first)."""
        return sorted(self.state.pods, key=lambda p: p.serial) if self.state else []

    def host(self, role: str) -> Host:
        """The Host of ``role``: ``init`` (the machine), ``node``, ``client``, ``pod-N``.

        Raises:
            TestbedError: down, or no such role.
        """
        self._require()
        if role == "init":
            return self.machine
        if role in ("node", "client"):
            return self.machine.netns(self.ns(role), host_name=role)
        if role.startswith("pod-") and role[4:].isdigit():
            pods = self.pods()
            i = int(role[4:])
            if 1 <= i <= len(pods):
                return self.machine.netns(pods[i - 1].netns, host_name=role)
        raise TestbedError(f"no role {role!r} on this testbed; roles: {', '.join(self.roles())}")

    def netns_roles(self) -> dict[int, str]:
        """Namespace inode -> role, the machine's own namespace included as ``init``."""
        out = {self.machine.own_netns_inode(): "init"}
        for role in self.roles():
            if role != "init":
                inode = self.machine.netns_inode(self.host(role).netns)
                if inode:
                    out[inode] = role
        return out

    @property
    def service(self) -> tuple[str, int]:
        """``(node_ip, node_port)``: port 69 of the plain server in iteration 1."""
        if self._require().server:
            return NODE_IP, 69
        return NODE_IP, self.manifests.service_port().node_port

    @property
    def file(self) -> ServedFile:
        """The served file (name, size, sha256)."""
        f = self._require().file
        return ServedFile(f.name, f.size, f.sha256)

    def status(self) -> dict[str, Any]:
        """The ``labkit status --json`` document (``state: down`` when nothing is up)."""
        return status_document(self)

    # --- a replay run's testbed ---

    is_local = property(lambda self: self.machine.is_local, doc="True when the namespaces are this machine's.")

    def node_machine(self) -> NodeMachine:
        """The machine the namespaces are on: background flows and the machine check run there."""
        return NodeMachine(self.machine, self.state_dir, self.python)

    @classmethod
    def for_replay(cls, run_id: str, **options: Any) -> "NetnsTestbed":
        """The testbed of the replay run ``run_id``: its state in that run's state folder."""
        from labkit.results import replay_state_dir

        return super().for_replay(run_id, state_dir=replay_state_dir(run_id), **options)

    def teardown(self) -> list[str]:
        """Outside a replay, :meth:`down`; in a replay run, undo every testbed run its state folder records
        on the machine (one a dead kernel left too), restore the global sysctls, remove the emptied folders.

        Raises:
            TestbedError: something could not be removed (named; the rest was).
        """
        if self.replay_run_id is None:
            return super().teardown()
        removed = clean_folder(self.state_dir, host=self.machine)
        self.state, self.run_id = None, None
        return removed


def _discard_run(run: Path, host: Host | None = None) -> list[dict[str, Any]]:
    """Undo a run's ledger, then remove its folder (state, logs, stale temporary files)."""
    host = host or _here
    done = Ledger(run, host=host).undo()
    host.remove(run)
    return done
