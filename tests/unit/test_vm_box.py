"""The box builder's pure parts: the mirror from apt sources, the recipe key, wheel checks."""

from __future__ import annotations

import zipfile

import pytest

from labkit.exceptions import VMError
from labkit.vm import box

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_mirror_comes_from_a_deb822_source_not_the_security_one():
    assert box.mirror_from_sources([DEB822]) == "http://deb.debian.org/debian"


def test_the_mirror_comes_from_a_one_line_source_with_options():
    text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib\n"
    assert box.mirror_from_sources(["deb https://x/y nodistro main\n", text]) == "http://mirror.example/debian"


def test_no_bookworm_main_source_is_none_and_host_mirror_says_so(tmp_path):
    assert box.mirror_from_sources(["deb http://x/debian bullseye main\n", DEB822.replace("main", "contrib")]) is None
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb http://x/debian bullseye main\n")
    with pytest.raises(VMError, match="serves bookworm main; give the mirror with --mirror"):
        box.host_mirror(tmp_path)


def _recipe(**change):
    base = dict(suite="bookworm", mirror="http://m/debian", packages=["a", "b"], files={"/etc/x": ["1", 0o644]},
                python=["pyyaml>=6"], vagrant_key="ssh-rsa AAA")
    base.update(change)
    return box.Recipe(**base)


def test_the_recipe_key_is_stable_and_changes_with_what_the_box_holds():
    assert _recipe().key() == _recipe().key()
    keys = {_recipe().key(), _recipe(packages=["a", "b", "c"]).key(), _recipe(mirror="http://n/debian").key(),
            _recipe(files={"/etc/x": ["2", 0o644]}).key(), _recipe(python=["pyyaml>=7"]).key()}
    assert len(keys) == 5


def test_guest_requirements_are_pyprojects_without_jupyterlab(tmp_path):
    p = tmp_path / "pyproject.toml"
    p.write_text('[project]\nname="x"\ndependencies = ["jupyterlab>=4", "pyyaml>=6", "paramiko>=3.4"]\n')
    assert box.guest_requirements(p) == ["paramiko>=3.4", "pyyaml>=6"]
    p.write_text("[project]\nname='x'\n")
    with pytest.raises(VMError, match="cannot read \\[project\\] dependencies"):
        box.guest_requirements(p)


def _wheel(folder, name, version, requires=None):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    if requires:
        meta += f"Requires-Python: {requires}\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\nlong description: 1\n")
    return path


def test_wheels_the_guest_python_refuses_are_found(tmp_path):
    bad = _wheel(tmp_path, "soupsieve", "2.10", ">=3.11.5")
    _wheel(tmp_path, "pyyaml", "6.0", ">=3.8")
    _wheel(tmp_path, "plain", "1.0")
    assert box.wheels_refusing(tmp_path, "3.11.2") == [(bad, "soupsieve", "2.10")]
    assert box.wheels_refusing(tmp_path, "3.12.0") == []


def test_the_box_vagrantfile_boots_the_kernel_directly_under_tcg():
    text = box.box_vagrantfile("root=/dev/vda rw quiet")
    assert 'lv.driver = "qemu"' in text and "lv.kernel" in text and "lv.initrd" in text
    # the command line in a global the project's Vagrantfile extends per machine (systemd.hostname=)
    assert '$labkit_box_cmdline = "root=/dev/vda rw quiet"' in text and "lv.cmd_line = $labkit_box_cmdline" in text


def test_each_vm_gets_its_own_machine_id_dhcp_id_and_host_keys():
    assert "ClientIdentifier=mac" in box.GUEST_FILES["/etc/systemd/network/90-dhcp.network"][0]
    assert "UseGateway=no" in box.GUEST_FILES["/etc/systemd/network/90-dhcp.network"][0]  # no route off
    unit = box.GUEST_FILES["/etc/systemd/system/labkit-ssh-hostkeys.service"][0]
    assert "ssh-keygen" in unit and "ssh_host_ed25519_key" in unit and "Before=ssh.service" in unit
    assert "labkit-ssh-hostkeys" in box.ENABLE and "tftpd-hpa" in box.DISABLE


def test_the_hostname_unit_writes_the_command_lines_name_where_hostname_f_finds_it(tmp_path):
    """The unit's own shell line, run here on stand-in files: /etc/hostname and the 127.0.1.1
    line of /etc/hosts get the kernel's hostname (systemd.hostname=NAME), so Vagrant's
    ``hostname -f | grep '^NAME$'`` check passes and it leaves the name alone."""
    import subprocess

    unit = box.GUEST_FILES["/etc/systemd/system/labkit-hostname.service"][0]
    assert "ConditionKernelCommandLine=systemd.hostname" in unit and "labkit-hostname" in box.ENABLE
    line = unit.split("ExecStart=/bin/sh -c ", 1)[1].split("\n\n", 1)[0].replace("\\\n", "")
    script = line.strip().strip("'").replace("$$", "$").replace("%%", "%")
    (tmp_path / "kernel-hostname").write_text("worker-1\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 labkit\n")
    script = (script.replace("/proc/sys/kernel/hostname", str(tmp_path / "kernel-hostname"))
              .replace("/etc/", f"{tmp_path}/"))
    subprocess.run(["sh", "-c", script], check=True)
    assert (tmp_path / "hostname").read_text() == "worker-1\n"
    assert (tmp_path / "hosts").read_text() == "127.0.0.1 localhost\n127.0.1.1 worker-1\n"


def test_the_box_masks_nothing_the_lab_or_the_kubelet_double_needs():
    needed = {"ssh.service", "systemd-networkd.service", "systemd-journald.service", "dbus.service",
              "systemd-udevd.service", "systemd-user-sessions.service", "systemd-modules-load.service",
              "labkit-ssh-hostkeys.service", "systemd-sysctl.service", "kubelet.service"}
    assert not needed & set(box.MASK)
    assert "systemd-logind.service" in box.MASK and "apt-daily.timer" in box.MASK
    # the small initrd holds what mounts the root, and no fsck of it at boot
    assert box.GUEST_FILES["/etc/initramfs-tools/conf.d/labkit.conf"][0].startswith("MODULES=list\n")
    assert set(box.GUEST_FILES["/etc/initramfs-tools/modules"][0].split()) == {"virtio_pci", "virtio_blk", "ext4"}
    assert box.GUEST_FILES["/etc/fstab"][0].split()[-1] == "0"
    assert _recipe().key() != _recipe(mask=["x.service"]).key()


def test_building_needs_root(monkeypatch, tmp_path):
    monkeypatch.setattr(box.os, "geteuid", lambda: 1000)
    with pytest.raises(VMError, match="needs root"):
        box.BoxBuilder(_recipe(), tmp_path).build()
