"""The doctor's table and verdict, with checks made up so no root is needed."""

from labkit import doctor
from labkit.cli import main
from labkit.doctor import Check, format_table, missing


def test_table_names_each_check_its_state_and_the_fix_when_missing():
    checks = [Check("program conntrack", False, "not found", "apt-get install conntrack"),
              Check("root", True, "uid 0"),
              Check("program atftp", False, "not found", "apt-get install atftp", required=False)]
    table = format_table(checks)
    lines = table.splitlines()
    assert lines[0].split() == ["check", "state", "found", "how", "to", "fix"]
    conn = next(line for line in lines if line.startswith("program conntrack"))
    assert "MISSING" in conn and "apt-get install conntrack" in conn
    root = next(line for line in lines if line.startswith("root"))
    assert " ok " in root + " " and "apt-get" not in root
    assert "optional" in next(line for line in lines if line.startswith("program atftp"))
    assert [c.name for c in missing(checks)] == ["program conntrack"]


def test_doctor_exits_non_zero_naming_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run_checks", lambda: [
        Check("root", True, "uid 0"), Check("program in.tftpd", False, "not found", "apt-get install tftpd-hpa")])
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "1 required item(s) missing on this machine: program in.tftpd" in out


def test_doctor_exits_zero_when_all_is_there(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run_checks", lambda: [Check("root", True, "uid 0")])
    assert main(["doctor"]) == 0
    assert "the netns testbed can run" in capsys.readouterr().out


def test_the_command_line_starts_without_the_heavy_libraries():
    # every `labkit` command (the loadgen's CPU budget included) pays for what the
    # parser imports; pandas, papermill and matplotlib load only where they are used
    import subprocess
    import sys
    code = ("import sys, labkit.cli; labkit.cli.build_parser(); "
            "print(sorted(m for m in ('pandas', 'papermill', 'matplotlib', 'nbconvert') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cgroup_check_fails_when_v2_cpu_is_not_delegated_to_children(tmp_path, monkeypatch):
    """cgroup v2 with the cpu controller present but not in subtree_control: pods cannot get a
    CPU limit, so doctor must not say ok (it did: it only read cgroup.controllers)."""
    from labkit import cgroups, doctor

    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory pids\n")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    check = doctor.check_cgroup_cpu()
    assert not check.ok
    assert "not enabled for child cgroups" in check.detail
    assert "+cpu > /sys/fs/cgroup/cgroup.subtree_control" in check.fix

    (tmp_path / "cgroup.subtree_control").write_text("cpu memory pids\n")
    check = doctor.check_cgroup_cpu()
    assert check.ok and "cgroup v2" in check.detail
