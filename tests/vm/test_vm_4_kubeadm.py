"""The kubeadm driver against real VMs: the project's Vagrantfile, the local box, three VMs.

``vagrant up`` (python-vagrant, the ``vagrant`` testbed's own path) brings up the control
plane, worker-1 and the client from the VM test box (labkit's box plus the Kubernetes
doubles of ``tests/vm/kube_double``, built in before boot), running the project's
provisioning scripts.  The vagrant testbed then runs ONE iteration (8 of the quick
profile: node sysctls, the kubelet's allowedUnsafeSysctls, pod sysctls) with
:func:`labkit.run.run_iteration`: real SSH (Paramiko, host keys pinned through
``vagrant ssh``), real sudo, real sysctls on the guests' kernel (written, persisted in
/etc/sysctl.d, read back), the real kubelet config edit and ``systemctl restart``
(of the double's unit), the monitor's agent on the worker, the loadgen from the client
VM through the NodePort to the pod.  ``labkit down`` then undoes it.  What was real and
what a double is in :data:`REAL` and ``tests.vm.kube_box.DOUBLES`` (printed at the end).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from labkit.scenario import load_scenario
from labkit.testbed.kubeadm import KUBELET_CONFIG, SYSCTL_FILE
from labkit.testbed.vagrant import VagrantTestbed
from labkit.vm.guest import VagrantLab
from labkit.vm.libvirtd import LibvirtLab
from tests.vm.conftest import NOTES, VM_WORK, assert_machine_as_before, timed
from tests.vm.kube_box import BOX_NAME, DOUBLES, build_kube_box

pytestmark = [pytest.mark.vm, pytest.mark.vm_cluster]

ROOT = Path(__file__).resolve().parents[2]
REAL = ("VMs (QEMU TCG, Debian 12 kernel 6.1), vagrant up/destroy with vagrant-libvirt, the Vagrantfile "
        "and its provisioning scripts, python-vagrant, Paramiko SSH with pinned host keys, sudo, "
        "sysctl -w/-n on the worker's kernel, /etc/sysctl.d/90-labkit.conf, the kubelet config edit, "
        "systemctl restart kubelet (systemd), nsenter into the pod netns, iptables raw helper rule and "
        "the NodePort DNAT, conntrack with the TFTP helper, in.tftpd in the pod netns under a CPU quota, "
        "the monitor's agent on the worker, the loadgen on the client VM, TFTP over the isolated network")
SETTINGS = {"box_source": "local", "local_box": BOX_NAME, "storage_pool": "labkit",
            "machines": {"control-plane": {"cpus": 1, "memory": 1024}, "worker": {"cpus": 2, "memory": 1024},
                         "client": {"cpus": 1, "memory": 1536}}}


def project_copy(dest: Path) -> Path:
    """What the Vagrantfile reads and uploads, copied (the testbed keeps its state beside it)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("Vagrantfile", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("vagrant", "k8s-manifests", "labkit"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def cluster(machine_before, built_box, tmp_path_factory):
    """The three cluster VMs up, as ``(libvirt, vagrant_lab, testbed)``; all torn down after."""
    with timed("kube box build (derive)"):
        kube = build_kube_box(built_box)
    for step, seconds in kube.seconds.items():
        NOTES.append(f"kube box {step}: {seconds:g} s")
    settings = yaml.safe_load((ROOT / "vagrant" / "settings.yaml").read_text())
    settings.update(SETTINGS)
    path = tmp_path_factory.mktemp("kube") / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    work = VM_WORK / "kube"
    root = project_copy(work / "project")
    libvirt = LibvirtLab()
    with timed("libvirt start (kube)"):
        libvirt.start()
    lab = VagrantLab(libvirt, work, path, root=root)
    testbed = None
    try:
        with timed("vagrant box add (kube)"):
            lab.add_box(kube.box, kube.key, BOX_NAME)
        testbed = VagrantTestbed(root=root, settings=path, vagrant=lab.python_vagrant(), via_netns=libvirt.netns)
        with timed("vagrant up cluster (3 VMs)"):
            testbed.bring_up()
        yield libvirt, lab, testbed
    finally:
        with timed("teardown (kube)"):
            try:
                if testbed is not None and testbed._inventory is not None:
                    testbed.inventory.close()
                lab.destroy()
            finally:
                libvirt.stop()
        assert_machine_as_before(machine_before)


def _sh(host, cmd: str) -> str:
    return host.run(cmd, timeout=120).stdout


def test_one_kubeadm_iteration_runs_against_the_three_vms(cluster, tmp_path):
    from labkit.run import run_iteration

    _, lab, testbed = cluster
    iteration = load_scenario().iteration(8, "quick")
    worker = lab.host("worker-1")
    kubelet_before = _sh(worker, "systemctl show -p InvocationID --value kubelet").strip()
    originals = _sh(worker, "sysctl -n net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_udp_timeout").split()

    with timed("tests: kubeadm iteration 8"):
        row = run_iteration(testbed, iteration, tmp_path / "it8")
    NOTES.append(f"kubeadm iteration 8 (quick) on VMs: {row['transfers_per_s']} transfers/s, "
                 f"{row['transfers_ok']} ok, {row['transfers_failed']} failed")
    # the loadgen on the client VM fetched the file through the worker's NodePort from the pod
    assert row["transfers_ok"] > 0
    load = json.loads((tmp_path / "it8" / "load-summary.json").read_text())
    assert load["testbed"]["testbed"] == "vagrant" and load["testbed"]["replicas"] == 1
    # the monitor's agent on the worker sampled the node's and the pod's tables
    samples = pd.read_csv(tmp_path / "it8" / "samples.csv")
    counts = samples[samples["metric"] == "nf_conntrack_count"]
    assert {"node", "pod-1"} <= set(counts["netns"]) and counts["value"].max() > 0

    # node sysctls: set on the worker's kernel, persisted, read back
    want = {k: str(v) for k, v in iteration.node_sysctls.items()}
    names = sorted(want)
    assert _sh(worker, "sysctl -n " + " ".join(names)).split() == [want[n] for n in names]
    persisted = _sh(worker, f"cat {SYSCTL_FILE}")
    for name in names:
        assert f"{name} = {want[name]}" in persisted
    # the kubelet's config edited and the kubelet restarted (a new invocation of its unit)
    config = yaml.safe_load(_sh(worker, f"cat {KUBELET_CONFIG}"))
    assert config["allowedUnsafeSysctls"] == list(iteration.allowed_unsafe_sysctls)
    assert _sh(worker, "systemctl show -p InvocationID --value kubelet").strip() != kubelet_before
    # the pod's sysctls, read inside its network namespace on the worker
    pod = testbed.driver.pods[0]
    got = _sh(worker, f"nsenter -t {pod['pid']} -n sysctl -n net.netfilter.nf_conntrack_udp_timeout").strip()
    assert got == str(iteration.pod_sysctls["net.netfilter.nf_conntrack_udp_timeout"])
    assert "--helper tftp" in _sh(worker, "iptables -t raw -S PREROUTING")

    with timed("tests: kubeadm down"):
        testbed.down()
    # everything undone on the worker: sysctls, their file, the kubelet's config, the pods
    assert _sh(worker, "sysctl -n net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_udp_timeout"
               ).split() == originals
    assert not worker.run(["test", "-e", SYSCTL_FILE], timeout=60, check=False).ok
    assert "allowedUnsafeSysctls" not in _sh(worker, f"cat {KUBELET_CONFIG}")
    assert "--helper tftp" not in _sh(worker, "iptables -t raw -S PREROUTING")
    assert _sh(worker, "ip netns list").strip() == ""
    worker.close()
    NOTES.append("kubeadm on VMs, real: " + REAL)
    NOTES.append("kubeadm on VMs, doubles: " + "; ".join(f"{k} ({v})" for k, v in DOUBLES.items()))
