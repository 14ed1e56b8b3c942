"""The interface every testbed backend implements (netns, vagrant, ssh).

A testbed builds the topology an :class:`~labkit.scenario.Iteration` needs and
reconfigures it for the next one; the run, the monitor and the load generator
reach its machines and namespaces only through :meth:`Testbed.host`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from labkit.host import Host


@dataclass(frozen=True)
class ServedFile:
    """The file the TFTP servers serve.

    Attributes:
        name: its name as a client requests it.
        size: bytes.
        sha256: hex digest, to check a fetched copy.
    """

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class NodeMachine:
    """The machine whose kernel is a testbed's node, as labkit drives it directly.

    The background flows (:mod:`labkit.background`) and the replay's machine check
    (:mod:`labkit.adapt`) run there.

    Attributes:
        host: the machine (this one, or one reached over SSH).
        state_dir: the testbed's state directory on it.
        python: the interpreter there that can import labkit.
    """

    host: Host
    state_dir: Any
    python: str


class Testbed(ABC):
    """A Kubernetes-shaped node with TFTP pods behind a NodePort, and a client.

    Roles: ``init`` (the machine's own namespace, or the node's host), ``node``,
    ``pod-1``.. (1-based), ``client``.
    """

    name: str = "testbed"
    #: True when the testbed's node is this machine's own kernel (its namespaces).  Where
    #: background flows and the machine check run is :meth:`node_machine`.
    is_local: bool = False
    #: The replay run this testbed was built for (:meth:`for_replay`), None outside a replay.
    replay_run_id: str | None = None

    @classmethod
    def for_replay(cls, run_id: str, **options: Any) -> "Testbed":
        """The testbed a notebook of the replay run ``run_id`` uses, built with ``options``.

        Backends that keep their state per replay run (the netns testbed: in the replay
        run's state folder) override this; by default it is the same testbed as outside a
        replay, marked with ``replay_run_id``.
        """
        testbed = cls(**options)
        testbed.replay_run_id = run_id
        return testbed

    @abstractmethod
    def up(self, iteration) -> None:
        """Build the testbed for ``iteration``, or reconfigure a running one (replicas,
        sysctls, CPU limits) without leaking anything.

        Raises:
            PodRejected: a pod's sysctls are refused (nothing was changed).
            TestbedError: it could not be built (what was made is removed again).
        """

    @abstractmethod
    def down(self) -> None:
        """Remove everything this testbed made and restore the global sysctls; idempotent."""

    def teardown(self) -> list[str]:
        """Remove whatever this testbed left up, however its user ended (a notebook that
        failed half way), and restore the global sysctls; idempotent.

        The replay driver calls it after every notebook.  By default it is :meth:`down`.

        Returns:
            One line per resource removed, where the backend says (empty otherwise).
        """
        self.down()
        return []

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """The ``labkit status --json`` document: testbed, state, service, file, hosts..."""

    @abstractmethod
    def host(self, role: str) -> Host:
        """The :class:`~labkit.host.Host` playing ``role``.

        Raises:
            TestbedError: no such role (the message lists the roles), or the testbed is down.
        """

    @abstractmethod
    def roles(self) -> list[str]:
        """The roles in order, e.g. ``["init", "node", "pod-1", "client"]``."""

    @property
    @abstractmethod
    def service(self) -> tuple[str, int]:
        """``(node_ip, node_port)`` a client sends its requests to."""

    @property
    @abstractmethod
    def file(self) -> ServedFile:
        """The served file."""

    def monitor_targets(self) -> dict[str, Host]:
        """The hosts/namespaces a monitor samples: init, node and the pods (not the client)."""
        return {role: self.host(role) for role in self.roles() if role != "client"}

    def netns_roles(self) -> dict[int, str]:
        """Network namespace inode -> role, to attribute kernel log lines (empty when unknown)."""
        return {}

    def node_machine(self) -> NodeMachine | None:
        """The machine whose kernel is the node, where labkit can run processes of its own
        beside the lab (background flows, the machine check); None when it cannot (a cluster)."""
        return None

    @property
    def is_up(self) -> bool:
        """True while the testbed is built."""
        return self.status().get("state") == "up"

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
