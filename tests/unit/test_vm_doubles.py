"""The VM tier's pieces that need no VM: the derived box's key, plain QEMU's command line,
and the Kubernetes doubles' parsing (tests/vm/kube_double)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from labkit.vm import box
from labkit.vm.qemu import qemu_argv
from tests.vm import kube_box

ROOT = Path(__file__).resolve().parents[2]


def _double():
    spec = importlib.util.spec_from_file_location("kube_double", ROOT / "tests/vm/kube_double/kube_double.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _base(tmp_path: Path, key: str = "a" * 64) -> box.BoxBuild:
    recipe = box.Recipe(suite="bookworm", mirror="http://m/debian", packages=["curl"], files={}, python=[],
                        vagrant_key="ssh-rsa AAAA vagrant")
    d = tmp_path / key[:16]
    d.mkdir()
    (d / "recipe.json").write_text(json.dumps(asdict(recipe)))
    return box.BoxBuild(d / "x.box", d, key, {})


def test_a_derived_box_is_keyed_by_its_base_and_every_byte_and_mode_of_its_files(tmp_path):
    base = _base(tmp_path)
    files = {"/usr/local/bin/kubectl": ("#!/bin/sh\n", 0o755)}
    one = box.DerivedBoxBuilder(base, "labkit/debian12-kube", files)
    assert one.key == box.DerivedBoxBuilder(base, "labkit/debian12-kube", dict(files)).key
    assert one.dir.parent == tmp_path / "derived" and one.dir.name.startswith("labkit-debian12-kube-")
    assert one.box.name == "labkit-debian12-kube.box" and one.name == "labkit/debian12-kube"
    other_mode = box.DerivedBoxBuilder(base, "n", {"/usr/local/bin/kubectl": ("#!/bin/sh\n", 0o644)})
    other_bytes = box.DerivedBoxBuilder(base, "n", {"/usr/local/bin/kubectl": ("#!/bin/sh \n", 0o755)})
    other_base = box.DerivedBoxBuilder(_base(tmp_path, "b" * 64), "n", files)
    assert len({one.key, other_mode.key, other_bytes.key, other_base.key}) == 4


def test_the_kube_box_holds_every_double_and_the_served_file_of_the_quick_profile():
    files = kube_box.files()
    for tool in ("kubeadm", "kubectl", "kubelet", "crictl"):
        assert f"kube_double.py {tool} " in files[f"/usr/local/bin/{tool}"][0].decode()
    assert files["/srv/tftp/file-5120.bin"][0] == kube_box.served_file() and len(kube_box.served_file()) == 5120
    assert b"Restart=always" in files["/etc/systemd/system/kubelet.service"][0]
    assert files[f"{kube_box.LIB}/entrypoint.sh"][0] == (ROOT / "k8s-manifests/image/entrypoint.sh").read_bytes()


def test_plain_qemu_runs_with_restricted_user_networking_and_tcg(tmp_path):
    argv = qemu_argv(tmp_path, tmp_path / "d.qcow2", tmp_path / "c.log", tmp_path / "p", 2222)
    assert argv[argv.index("-netdev") + 1] == "user,id=net0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:2222-:22"
    assert argv[argv.index("-accel") + 1] == "tcg" and "-nodefaults" in argv
    assert "restrict=off" not in " ".join(argv)


def test_plain_qemu_boots_with_the_boxs_own_command_line_unless_told_otherwise(tmp_path):
    from labkit.vm.box import KERNEL_CMDLINE

    def append(**kw):
        argv = qemu_argv(tmp_path, tmp_path / "d.qcow2", tmp_path / "c.log", tmp_path / "p", 2222, **kw)
        return argv[argv.index("-append") + 1], argv[argv.index("-initrd") + 1]

    assert append() == (KERNEL_CMDLINE, str(tmp_path / "initrd.img"))  # a box older than its cmdline file
    (tmp_path / "cmdline").write_text("root=/dev/vda rw console=ttyS0 quiet\n")
    assert append()[0] == "root=/dev/vda rw console=ttyS0 quiet"
    assert append(cmdline="root=/dev/vda", initrd=tmp_path / "other.img") == ("root=/dev/vda", str(tmp_path / "other.img"))


def test_the_kubectl_double_parses_the_drivers_commands():
    kd = _double()
    pos, opts = kd._parse(["rollout", "status", "deployment/tftp-server", "-n", "default", "--timeout=180s"])
    assert pos == ["rollout", "status", "deployment/tftp-server"]
    assert opts == {"namespace": "default", "timeout": "180s"}
    assert kd._seconds("180s", 1) == 180 and kd._seconds("2m", 1) == 120
    doc = {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c"}]}}}}
    kd._json_patch(doc, {"op": "replace", "path": "/spec/replicas", "value": 2})
    kd._json_patch(doc, {"op": "add", "path": "/spec/template/spec/containers/0/env", "value": []})
    assert doc["spec"]["replicas"] == 2 and doc["spec"]["template"]["spec"]["containers"][0]["env"] == []
    with pytest.raises(KeyError, match="missing path"):
        kd._json_patch(doc, {"op": "replace", "path": "/spec/paused", "value": True})


def test_the_kubelet_double_admits_sysctls_as_the_kubelet_does():
    kd = _double()
    kubelet = kd.Kubelet("worker-1", {"allowedUnsafeSysctls": ["net.netfilter.nf_conntrack_udp_timeout*"]}, None)
    assert kubelet.prefix == "10.244.1"
    assert kubelet._forbidden({"net.ipv4.tcp_syncookies": "1"}) is None  # the safe set
    assert kubelet._forbidden({"net.netfilter.nf_conntrack_udp_timeout_stream": "20"}) is None
    assert kubelet._forbidden({"net.core.somaxconn": "1024"}) == "net.core.somaxconn"
    assert kd.SAFE_SYSCTLS == set(__import__("labkit.manifests", fromlist=["x"]).SAFE_SYSCTLS)
