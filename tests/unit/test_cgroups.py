"""cgroups: the CPU this process may use, and removal of a throttled cgroup (no root needed)."""

from __future__ import annotations

from labkit import cgroups


def test_own_cgroup_is_read_from_proc_self_cgroup():
    v1 = "12:pids:/\n4:cpu,cpuacct:/lkbudget-7\n0::/user.slice\n"
    assert cgroups.own_cgroup(1, v1) == "/lkbudget-7"
    assert cgroups.own_cgroup(2, v1) == "/user.slice"
    assert cgroups.own_cgroup(1, "0::/\n") == "/"


def test_quota_in_cores_from_either_version(tmp_path):
    (tmp_path / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroups.quota_cores(tmp_path, 1) == 0.5
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroups.quota_cores(tmp_path, 1) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroups.quota_cores(tmp_path, 2) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroups.quota_cores(tmp_path, 2) is None


def test_a_throttled_cgroup_gets_its_limit_lifted_before_its_processes_are_killed(tmp_path, monkeypatch):
    # a pod at 0.087 CPU full of forked servers: killed processes need CPU to exit
    group = tmp_path / "lkpod"
    group.mkdir()
    (group / "cpu.cfs_quota_us").write_text("8700\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    (group / "cgroup.procs").write_text("")
    seen = []
    monkeypatch.setattr(cgroups.Path, "rmdir", lambda self: seen.append(
        (self, (group / "cpu.cfs_quota_us").read_text().strip())))
    cgroups.remove_cgroup(group)
    assert seen == [(group, "-1")]


def test_a_cgroup_without_a_cpu_controller_is_removed_without_a_word(tmp_path, monkeypatch, caplog):
    # a notebook kernel's cgroup in the pids hierarchy (cgroup v1): it has no CPU limit to lift
    group = tmp_path / "lkreplay-x-iteration-3-abcd"
    group.mkdir()
    (group / "cgroup.procs").write_text("")
    removed = []
    monkeypatch.setattr(cgroups.Path, "rmdir", lambda self: removed.append(self))
    with caplog.at_level("WARNING"):
        cgroups.remove_cgroup(group)
    assert removed == [group] and not caplog.records
    assert not (group / "cpu.cfs_quota_us").exists()


def test_available_cpus_is_at_most_the_cpus_this_process_may_run_on():
    import os

    assert 0 < cgroups.available_cpus() <= len(os.sched_getaffinity(0))


class _OtherMachine:
    """A machine reached over SSH (as far as available_cpus asks): 4 CPUs, the lab's session
    in a cgroup with a 1.5-core quota under a parent with 3 (cgroup v2)."""

    is_local = False
    name = "root@lab"
    files = {"/sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
             "/sys/fs/cgroup/cgroup.subtree_control": "cpu memory pids\n",
             "/sys/fs/cgroup/lab.slice/cpu.max": "300000 100000\n",
             "/sys/fs/cgroup/lab.slice/session-4.scope/cpu.max": "150000 100000\n"}

    def __init__(self):
        self.commands = []

    def run(self, argv, **kw):
        from labkit.host import Result

        self.commands.append(list(argv))
        out = {"nproc": "4\n", "cat": "0::/lab.slice/session-4.scope\n"}[argv[0]]
        return Result(" ".join(argv), self.name, 0, out, "", 0.01)

    def exists(self, path):
        return str(path) in self.files

    def read_file(self, path):
        try:
            return self.files[str(path)].encode()
        except KeyError:
            raise FileNotFoundError(path) from None


def test_available_cpus_of_another_machine_are_measured_there():
    machine = _OtherMachine()
    assert cgroups.available_cpus(machine) == 1.5  # that machine's CPUs and quotas, not this one's
    assert ["nproc"] in machine.commands and ["cat", "/proc/self/cgroup"] in machine.commands
    del machine.files["/sys/fs/cgroup/lab.slice/session-4.scope/cpu.max"]
    assert cgroups.available_cpus(machine) == 3.0
    machine.files.pop("/sys/fs/cgroup/lab.slice/cpu.max")
    assert cgroups.available_cpus(machine) == 4.0
