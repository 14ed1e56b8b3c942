"""The ``ssh`` testbed (``--testbed ssh``): the kubeadm driver on an existing cluster, from an inventory.

The inventory (see :mod:`labkit.testbed.cluster` for its fields) comes from the
``inventory`` option, ``$LABKIT_INVENTORY``, or ``./inventory.yaml``.  What the
driver changed is remembered in ``~/.local/state/labkit/ssh-<name>.json``, so
``labkit down --testbed ssh`` from another shell undoes exactly that.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from labkit.exceptions import ScenarioError
from labkit.testbed.cluster import ClusterTestbed, load_inventory

STATE_DIR = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "labkit"


def inventory_path(inventory: str | os.PathLike | None = None) -> Path:
    """The inventory file to use: the argument, ``$LABKIT_INVENTORY``, or ``./inventory.yaml``.

    Raises:
        ScenarioError: the file does not exist (says how to give one).
    """
    path = Path(inventory or os.environ.get("LABKIT_INVENTORY") or "inventory.yaml").expanduser()
    if not path.is_file():
        raise ScenarioError("no such inventory file; give one with LABKIT_INVENTORY=path "
                            "(fields: docs/vagrant.md, 'Any kubeadm cluster')", path=str(path))
    return path


class SSHTestbed(ClusterTestbed):
    """An existing kubeadm cluster listed in an inventory file.

    Args:
        inventory: the inventory file.
        state_dir: where the driver's state file goes.
        helper_rule: add the explicit TFTP conntrack helper rule on the node.
    """

    name = "ssh"

    def __init__(self, *, inventory: str | os.PathLike | None = None,
                 state_dir: str | os.PathLike | None = None, helper_rule: bool = True, **ignored: Any):
        path = inventory_path(inventory).resolve()
        tag = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        state = Path(state_dir or STATE_DIR) / f"ssh-{path.stem}-{tag}.json"
        super().__init__(load_inventory(path), state_path=state, helper_rule=helper_rule)
