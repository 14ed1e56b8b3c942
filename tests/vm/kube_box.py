"""The VM test box of the kubeadm cluster: labkit's box plus the Kubernetes doubles.

What cannot be downloaded here (kubeadm, kubelet, kubectl, crictl, the pod image) is
stood in for by ``tests/vm/kube_double`` (see its docstring), written into a copy of
labkit's box before the disk image is made (:func:`labkit.vm.box.derive_box`):
nothing is installed into a running guest.  :data:`DOUBLES` lists them, for the
closing note of the vm tier.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from labkit.vm.box import BoxBuild, derive_box

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BOX_NAME = "labkit/debian12-kube"
FILE_SIZE = 5120  # the quick profile's served file
LIB = "/usr/local/lib/labkit-double"

DOUBLES = {
    "kubeadm": "init: signs the API server's cert with the Vagrantfile's CA, starts the API server "
               "double and the kubelet; join: checks the CA key hash and bootstrap token",
    "kube-apiserver": "HTTPS on :6443, Services/Deployments/node reports in memory",
    "kubectl": "apply/get/patch/scale/rollout status/delete/wait, kubectl 1.31's words",
    "kubelet": "systemd unit kubelet.service: validates its config, healthz :10248, sysctl admission "
               "(allowedUnsafeSysctls), pods as netns + in.tftpd in a systemd unit with CPUQuota",
    "kube-proxy": "the NodePort DNAT to the ready pods (chain KUBE-DOUBLE-NODEPORTS), inside the kubelet double",
    "crictl": "inspect prints a pod's PID from the kubelet double's record",
    "pod image": f"/srv/tftp/file-{FILE_SIZE}.bin in the box and k8s-manifests/image/entrypoint.sh",
    "CNI": "none: the pods are on the node's bridge cni0 (one worker)",
}


def served_file(size: int = FILE_SIZE) -> bytes:
    """The served file's bytes: the same in every build (the box is cached by its content)."""
    out = b""
    block = b"labkit"
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:size]


def files() -> dict[str, tuple[bytes, int]]:
    """Guest path -> (content, mode) of every double."""
    wrapper = "#!/bin/sh\n# labkit's test double (tests/vm/kube_double)\nexec /opt/labkit/venv/bin/python " \
              f"{LIB}/kube_double.py %s \"$@\"\n"
    out = {f"/usr/local/bin/{tool}": ((wrapper % tool).encode(), 0o755)
           for tool in ("kubeadm", "kubectl", "kubelet", "crictl")}
    out[f"{LIB}/kube_double.py"] = ((HERE / "kube_double" / "kube_double.py").read_bytes(), 0o755)
    out[f"{LIB}/entrypoint.sh"] = ((ROOT / "k8s-manifests" / "image" / "entrypoint.sh").read_bytes(), 0o755)
    out[f"{LIB}/kubelet-config.yaml"] = ((ROOT / "tests" / "data" / "kubeadm" / "kubelet-config.yaml").read_bytes(),
                                         0o644)
    for unit in ("kubelet.service", "kube-apiserver-double.service"):
        out[f"/etc/systemd/system/{unit}"] = ((HERE / "kube_double" / unit).read_bytes(), 0o644)
    out[f"/srv/tftp/file-{FILE_SIZE}.bin"] = (served_file(), 0o644)
    return out


def build_kube_box(base: BoxBuild) -> BoxBuild:
    """The test box, built now or found in the cache."""
    return derive_box(base, BOX_NAME, files())
