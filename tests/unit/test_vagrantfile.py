"""The Vagrantfile, its settings and provisioning scripts, checked by the real tools.

``vagrant validate`` (Debian's vagrant with the vagrant-libvirt plugin, which
make test installs) runs on a copy of the files it reads, so the worktree gets
no ``.vagrant/`` directory; ``shellcheck`` checks every provisioning script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import need_program

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "vagrant" / "provision").glob("*.sh"))


@pytest.fixture
def project(tmp_path):
    """A copy of what the Vagrantfile reads, and a private VAGRANT_HOME."""
    need_program("vagrant")
    for name in ("Vagrantfile", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("vagrant", "k8s-manifests", "labkit"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "home").mkdir()
    return tmp_path


def _validate(project: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, VAGRANT_HOME=str(project / "home"), VAGRANT_CHECKPOINT_DISABLE="1", **env)
    return subprocess.run(["vagrant", "validate"], cwd=project, env=full, capture_output=True,
                          text=True, timeout=120)


def test_vagrant_validate_passes(project):
    r = _validate(project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
    assert not (project / ".vagrant" / "labkit-pki").exists()  # only `up` makes the cluster CA


def test_a_bad_setting_is_refused_naming_the_file_and_field(project):
    settings = yaml.safe_load((project / "vagrant" / "settings.yaml").read_text())
    settings["machines"]["worker"]["memory"] = "lots"
    bad = project / "bad-settings.yaml"
    bad.write_text(yaml.safe_dump(settings))
    r = _validate(project, LABKIT_VAGRANT_SETTINGS=str(bad))
    assert r.returncode != 0
    assert f"{bad}: machines.worker.memory: must be a positive integer" in r.stdout + r.stderr


def test_three_roles_with_fixed_addresses_and_the_kubelet_bound_to_them():
    text = (ROOT / "Vagrantfile").read_text()
    for name in ('"control-plane"', '"worker-#{i}"', '"client"'):
        assert f"define_machine(config, {name}" in text
    common = (ROOT / "vagrant" / "provision" / "common.sh").read_text()
    assert "--node-ip=${NODE_IP}" in common
    for script in ("control-plane.sh", "worker.sh"):
        assert "node-ip: ${NODE_IP}" in (ROOT / "vagrant" / "provision" / script).read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_provisioning_scripts_pass_shellcheck(script):
    need_program("shellcheck")
    r = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def _settings_file(project: Path, **change) -> Path:
    settings = yaml.safe_load((project / "vagrant" / "settings.yaml").read_text())
    settings.update(change)
    path = project / "changed-settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_the_local_box_setting_validates_and_the_public_box_stays_the_default(project):
    settings = yaml.safe_load((project / "vagrant" / "settings.yaml").read_text())
    assert settings.get("box_source", "public") == "public"
    r = _validate(project, LABKIT_VAGRANT_SETTINGS=str(_settings_file(project, box_source="local",
                                                                      storage_pool="labkit")))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("change, message", [
    ({"box_source": "cloud"}, "box_source: must be public or local, got \"cloud\""),
    ({"box_source": "local", "provider": "virtualbox"}, "box_source: local (labkit's box"),
    ({"storage_pool": ""}, "storage_pool: must be non-empty text"),
])
def test_a_bad_box_setting_is_refused_naming_the_field(project, change, message):
    path = _settings_file(project, **change)
    r = _validate(project, LABKIT_VAGRANT_SETTINGS=str(path))
    assert r.returncode != 0
    assert f"{path}: {message}" in r.stdout + r.stderr


def test_the_lab_machine_is_opt_in_and_isolated_with_the_local_box(project):
    path = _settings_file(project, box_source="local")
    full = dict(os.environ, VAGRANT_HOME=str(project / "home"), VAGRANT_CHECKPOINT_DISABLE="1",
                LABKIT_VAGRANT_SETTINGS=str(path))
    r = subprocess.run(["vagrant", "status", "--machine-readable"], cwd=project, env=full,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    machines = {line.split(",")[1] for line in r.stdout.splitlines() if ",state," in line}
    assert machines == {"control-plane", "worker-1", "client", "lab"}
    text = (ROOT / "Vagrantfile").read_text()
    assert 'define_machine(config, "lab", nil, settings["machines"]["lab"], isolated: local_box, autostart: false)' in text
    assert 'lv.management_network_mode = "none"' in text and 'libvirt__forward_mode: "none"' in text


def test_each_vm_gets_its_files_as_one_archive_made_from_this_folder(project):
    """One upload per VM (a file provisioner pays an SSH round trip per file): labkit's source
    and the manifests as .tar.gz, with modes kept and no bytecode."""
    import tarfile

    cache = project / "labkit" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "stale.cpython-311.pyc").write_bytes(b"\0")
    r = _validate(project)
    assert r.returncode == 0, r.stdout + r.stderr
    upload = project / ".vagrant" / "labkit-upload"
    with tarfile.open(upload / "labkit-src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"labkit/__init__.py", "labkit/testbed", "pyproject.toml", "README.md"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    with tarfile.open(upload / "k8s-manifests.tar.gz") as tar:
        entry = tar.getmember("k8s-manifests/image/entrypoint.sh")
        assert entry.mode & 0o111 and tar.extractfile(entry).read() == \
            (ROOT / "k8s-manifests" / "image" / "entrypoint.sh").read_bytes()
    text = (ROOT / "Vagrantfile").read_text()
    assert text.count('m.vm.provision "file"') == 3   # control plane, workers, client: one each
