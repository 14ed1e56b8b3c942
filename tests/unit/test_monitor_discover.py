"""Namespace discovery on a fake node: /run/netns, /proc/PID/ns/net and container runtimes' records.

The fake tree has the real layout: ``/proc/PID/ns/net`` links whose text is
``net:[INODE]``, named namespaces as files, and the records containerd, CRI-O
and Docker keep for each container (annotations, pid files, netns paths).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labkit.monitor.discover import RuntimePods, all_netns, named_netns, process_netns

OWN = 4026531833


class FakeNode:
    """A fake node under ``root``: processes, named namespaces, runtime records."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = root / "proc"
        self.netns = root / "run/netns"
        self.containerd = root / "run/containerd/io.containerd.runtime.v2.task"
        self.crio = root / "run/containers/storage/overlay-containers"
        self.docker = root / "var/lib/docker/containers"
        for d in (self.proc, self.netns):
            d.mkdir(parents=True)
        (self.proc / "self").mkdir()

    def process(self, pid: int, inode: int) -> None:
        (self.proc / str(pid) / "ns").mkdir(parents=True)
        os.symlink(f"net:[{inode}]", self.proc / str(pid) / "ns" / "net")

    def named(self, name: str) -> int:
        """A named namespace; its inode is the file's (as a bind mount's is the namespace's)."""
        path = self.netns / name
        path.write_text("")
        return path.stat().st_ino

    def containerd_task(self, cid: str, pod: tuple[str, str], *, netns_path: str | None = None,
                        pid: int | None = None, kind: str = "sandbox", network: bool = True) -> None:
        folder = self.containerd / "k8s.io" / cid
        folder.mkdir(parents=True)
        spaces = [{"type": "pid"}] + ([{"type": "network", **({"path": netns_path} if netns_path else {})}]
                                      if network else [])
        (folder / "config.json").write_text(json.dumps({
            "annotations": {"io.kubernetes.cri.container-type": kind,
                            "io.kubernetes.cri.sandbox-namespace": pod[0],
                            "io.kubernetes.cri.sandbox-name": pod[1]},
            "linux": {"namespaces": spaces}}))
        if pid is not None:
            (folder / "init.pid").write_text(f"{pid}")

    def crio_container(self, cid: str, pod: tuple[str, str], pid: int) -> None:
        folder = self.crio / cid / "userdata"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({
            "annotations": {"io.kubernetes.pod.namespace": pod[0], "io.kubernetes.pod.name": pod[1]},
            "linux": {"namespaces": [{"type": "network"}]}}))
        (folder / "pidfile").write_text(f"{pid}\n")

    def docker_container(self, cid: str, pod: tuple[str, str], pid: int, mode: str = "container:abc") -> None:
        folder = self.docker / cid
        folder.mkdir(parents=True)
        (folder / "config.v2.json").write_text(json.dumps({
            "Config": {"Labels": {"io.kubernetes.pod.namespace": pod[0], "io.kubernetes.pod.name": pod[1]}},
            "HostConfig": {"NetworkMode": mode}, "State": {"Pid": pid}}))

    def pods(self) -> RuntimePods:
        return RuntimePods([str(self.containerd), str(self.crio), str(self.docker)], proc=str(self.proc))

    def discover(self):
        return all_netns(str(self.netns), str(self.proc), pods=self.pods(), own=OWN)()


@pytest.fixture
def node(tmp_path):
    return FakeNode(tmp_path)


def test_processes_are_grouped_by_namespace_with_the_lowest_pid(node):
    node.process(1, OWN)
    node.process(900, 4026532500)
    node.process(77, 4026532500)
    (node.proc / "cpuinfo").write_text("")
    (node.proc / "55").mkdir()              # a process that exited while listing: no ns/net
    got = process_netns(str(node.proc))
    assert got == {OWN: (1, f"{node.proc}/1/ns/net"), 4026532500: (77, f"{node.proc}/77/ns/net")}


def test_named_namespaces_and_a_missing_folder(node, tmp_path):
    inode = node.named("blue")
    assert named_netns(str(node.netns)) == {inode: ("blue", str(node.netns / "blue"))}
    assert named_netns(str(tmp_path / "nowhere")) == {}


def test_every_namespace_once_named_by_what_knows_it_best(node):
    node.process(1, OWN)
    blue = node.named("blue")
    node.process(300, blue)                                   # a process in a named namespace: one entry
    node.process(400, 4026532600)                             # a namespace only a process has
    cni = node.named("cni-1234")                              # a pod's namespace, pinned by the CNI plugin
    node.containerd_task("sb1", ("tftp", "tftp-server-7c9f-x2"), netns_path=str(node.netns / "cni-1234"))
    node.process(500, 4026532700)                             # a CRI-O pod found by its pid file
    node.crio_container("c2", ("kube-system", "coredns-5d78-abcde"), pid=500)
    found = node.discover()
    labels = {f.inode: (f.label, f.source) for f in found.values()}
    assert labels == {
        OWN: ("init", "init"),
        blue: ("blue", "named"),
        4026532600: ("netns:4026532600", "process"),
        cni: ("tftp/tftp-server-7c9f-x2", "pod"),
        4026532700: ("kube-system/coredns-5d78-abcde", "pod"),
    }
    assert found[OWN].path is None                            # sampled where the exporter runs
    assert found[blue].path == str(node.netns / "blue")
    assert found[4026532600].path == f"{node.proc}/400/ns/net"


def test_host_network_pods_do_not_name_the_nodes_namespace(node):
    node.process(1, OWN)
    node.process(600, OWN)
    node.containerd_task("sb2", ("kube-system", "kube-proxy-abc"), pid=600, network=False)
    node.docker_container("d1", ("kube-system", "node-exporter-xyz"), pid=600, mode="host")
    assert {f.label for f in node.discover().values()} == {"init"}


def test_docker_containers_of_pods_are_named_by_their_labels(node):
    node.process(700, 4026532800)
    node.docker_container("d2", ("web", "nginx-abc"), pid=700)
    assert node.pods()() == {4026532800: "web/nginx-abc"}


def test_a_pod_of_a_stopped_container_is_skipped_and_records_are_parsed_once(node, monkeypatch):
    node.containerd_task("sb3", ("web", "gone"), pid=4242)    # no /proc/4242: exited
    pods = node.pods()
    assert pods() == {}
    node.process(4242, 4026532900)
    assert pods() == {4026532900: "web/gone"}
    import labkit.monitor.discover as discover

    calls = []
    real = discover._pod_of
    monkeypatch.setattr(discover, "_pod_of", lambda record: calls.append(1) or real(record))
    pods()
    assert calls == []                                        # unchanged record: read from the cache


def test_two_namespaces_with_one_label_get_their_inodes(node):
    node.process(1, OWN)
    node.process(800, 4026533001)
    node.process(801, 4026533002)
    node.containerd_task("old", ("web", "api-0"), pid=800)
    node.containerd_task("new", ("web", "api-0"), pid=801)     # the pod's sandbox, re-created
    labels = {f.label for f in node.discover().values()}
    assert labels == {"init", "web/api-0@4026533001", "web/api-0@4026533002"}
