"""The lab's libvirt and guest helpers, without starting anything (no root, no daemons)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from labkit.exceptions import VMError
from labkit.vm import libvirtd
from labkit.remote.deploy import source_tarball
from labkit.vm.libvirtd import LibvirtLab, parse_virsh_list


def test_virsh_name_lists_are_parsed_without_blank_lines():
    assert parse_virsh_list("labkit_lab\n\nother \n") == ["labkit_lab", "other"]
    assert parse_virsh_list("\n") == []


def test_stopping_a_lab_that_never_started_removes_nothing(tmp_path):
    assert LibvirtLab(tmp_path / "state").stop() == []


def test_a_leftover_state_is_refused_naming_how_to_stop_it(tmp_path):
    lab = LibvirtLab(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"netns": "labkit-vm"}))
    with pytest.raises(VMError, match="stop it first"):
        lab._refuse_foreign()


def test_autostart_objects_of_the_machine_libvirt_are_refused(tmp_path, monkeypatch):
    auto = tmp_path / "autostart"
    auto.mkdir()
    (auto / "default.xml").write_text("<network/>")
    monkeypatch.setattr(libvirtd, "AUTOSTART_DIRS", (str(auto),))
    monkeypatch.setattr(libvirtd, "SOCKET", tmp_path / "no-socket")
    with pytest.raises(VMError, match="default.xml.*not starting"):
        LibvirtLab(tmp_path / "state")._refuse_foreign()


def test_the_uploaded_source_has_the_package_and_no_caches():
    with tarfile.open(fileobj=io.BytesIO(source_tarball())) as tar:
        names = tar.getnames()
    assert "labkit/__init__.py" in names and "labkit/vm/libvirtd.py" in names
    assert "k8s-manifests" in names and "pyproject.toml" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
