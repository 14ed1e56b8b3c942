"""labkit's box, built from the Debian archive with debootstrap, and found again in the cache."""

from __future__ import annotations

import json
import tarfile
import time

import pytest

from labkit.vm.box import build_box

pytestmark = pytest.mark.vm


def test_the_box_is_built_once_then_found_in_the_cache(built_box):
    start = time.monotonic()
    again = build_box()
    assert time.monotonic() - start < 10
    assert again.box == built_box.box and again.key == built_box.key
    assert set(again.seconds.values()) == {0.0}  # every step skipped as done


def test_the_box_holds_a_libvirt_image_booted_directly_and_what_the_lab_needs(built_box):
    with tarfile.open(built_box.box) as tar:
        names = set(tar.getnames())
        meta = json.load(tar.extractfile("metadata.json"))
        vagrantfile = tar.extractfile("Vagrantfile").read().decode()
        assert tar.extractfile("box.img").read(4) == b"QFI\xfb"  # qcow2
    assert {"box.img", "vmlinuz", "initrd.img", "Vagrantfile", "metadata.json"} <= names
    assert meta == {"provider": "libvirt", "format": "qcow2", "virtual_size": 4}
    assert 'lv.driver = "qemu"' in vagrantfile and "root=/dev/vda" in vagrantfile
    packages = (built_box.directory / "packages.txt").read_text()
    for pkg in ("linux-image-amd64", "openssh-server", "tftpd-hpa", "conntrack", "iptables", "python3-venv"):
        assert f"\n{pkg} " in "\n" + packages, pkg
    python = (built_box.directory / "python-packages.txt").read_text().lower()
    for dist in ("pandas==", "paramiko==", "pyyaml==", "papermill=="):
        assert dist in python, dist


def test_no_two_vms_of_the_box_share_a_machine_id_or_host_keys(built_box):
    root = built_box.directory / "rootfs"
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "var/lib/dbus/machine-id").readlink().as_posix() == "/etc/machine-id"
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
