"""`labkit monitor --serve` scraped by a real Prometheus, and `--all-netns` on the real kernel.

The first test brings the netns testbed up for iteration 4 (quick profile),
starts the exporter and a Prometheus (Debian's package) that scrapes it every
second with the rules of ``docs/prometheus/``, runs the iteration's load, and
asks Prometheus' HTTP API what a user's dashboard and alerts would show.  The
second makes and removes namespaces under a running ``--all-netns`` exporter.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from labkit.monitor import parse_conntrack_S
from tests.conftest import need_program, need_root, unique_name
from tests.integration.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs/prometheus/conntrack-rules.yml"
SCRAPE_CONFIG = ROOT / "docs/prometheus/prometheus.yml"
DASHBOARD = ROOT / "docs/grafana/conntrack-netns-dashboard.json"


class Exporter:
    """`labkit monitor --serve 127.0.0.1:0 ...` in a child process; its output lines in a list."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "labkit", "monitor", "--serve", "127.0.0.1:0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env or dict(os.environ))
        self.seen: list[str] = []          # its stdout lines so far
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        first = wait_for(lambda: self.seen or self.proc.poll() is not None, 60, "the exporter to start")
        match = re.search(r"serving (http://127\.0\.0\.1:(\d+)/metrics)", self.seen[0] if self.seen else "")
        if not match:
            self.proc.kill()
            raise AssertionError(f"no 'serving' line: {first!r}; stderr: {self.proc.stderr.read()}")
        self.url, self.port = match.group(1), int(match.group(2))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.seen.append(line.rstrip("\n"))

    def scrape(self) -> dict[tuple[str, str], float]:
        """``{(sample name, netns): value}`` of one scrape."""
        with urllib.request.urlopen(self.url, timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, s.labels.get("netns", "")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def netns_labels(self) -> set[str]:
        return {ns for (name, ns) in self.scrape() if name == "node_nf_conntrack_entries"}

    def stop(self) -> tuple[int, str]:
        """SIGTERM; return its exit code and stderr (its stdout lines are in :attr:`seen`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)
        return self.proc.returncode, self.proc.stderr.read()


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def dashboard_queries(window: str) -> list[tuple[str, str]]:
    """Each panel's query of the Grafana dashboard, its variables filled in as Grafana would."""
    import json

    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = (target["expr"].replace("$job", "conntrack-netns").replace("$instance", ".+")
                    .replace("$netns", ".+").replace("$__rate_interval", window))
            out.append((panel["title"], expr))
    return out


@pytest.fixture
def testbed(tmp_path, monkeypatch):
    """The netns testbed in this test's own state directory; brought down afterwards."""
    need_root()
    need_program("ip", "iptables-restore", "in.tftpd", "conntrack", "prometheus")
    from labkit.testbed import get_testbed
    from labkit.testbed.netns import clean

    state = tmp_path / "state"
    monkeypatch.setenv("LABKIT_STATE_DIR", str(state))
    tb = get_testbed("netns", global_wait=300)   # the global max is shared with other runs
    yield tb
    tb.down()
    clean(state)


def test_prometheus_sees_pod_and_node_reach_the_limit_and_node_drops(testbed):
    from labkit.loadgen import run_load_on
    from labkit.run import load_spec
    from labkit.scenario import load_scenario

    it = load_scenario().iteration(4, "quick")
    testbed.up(it)
    limit = it.node_sysctls["net.netfilter.nf_conntrack_max"]
    exporter = Exporter("--rescan", "1")           # the default rate (1 Hz), the testbed found by itself
    prom = None
    try:
        assert exporter.netns_labels() == {"init", "node", "pod-1"}
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())      # the docs' config, aimed at this exporter
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{exporter.port}"]}]
        prom = PrometheusServer(config, rule_files=(RULES,), interval=1.0).start()
        wait_for(lambda: {"node", "pod-1"} <= set(prom.query('node_nf_conntrack_entries{job="conntrack-netns"}')),
                 30, "Prometheus to scrape the exporter")
        t0 = time.time()
        run_load_on(testbed.host("client"), load_spec(testbed, it))
        time.sleep(3)                               # the scrapes after the load
        window = f"{int(time.time() - t0) + 5}s"

        peak = prom.query(f'max_over_time(node_nf_conntrack_entries{{job="conntrack-netns"}}[{window}])')
        limits = prom.query('node_nf_conntrack_entries_limit{job="conntrack-netns"}')
        assert limits["node"] == limits["pod-1"] == limit
        assert peak["node"] >= limit and peak["pod-1"] >= limit, peak
        drops = prom.query(f'rate(node_nf_conntrack_stat_drop{{job="conntrack-netns"}}[{window}])')
        assert drops["node"] > 0, drops

        # Prometheus holds the kernel's own figure (conntrack -S in the node), once the load is over
        reference = parse_conntrack_S(testbed.host("node").run(["conntrack", "-S"]).stdout)["drop"]
        wait_for(lambda: prom.query('node_nf_conntrack_stat_drop{job="conntrack-netns"}').get("node") == reference,
                 10, f"node_nf_conntrack_stat_drop{{netns='node'}} to reach conntrack -S's {reference}")

        # the docs' alert rule fires for both namespaces; the drop alert is pending (for: 2m) on the node
        alerts = prom.api("alerts")["alerts"]
        full = {a["labels"]["netns"] for a in alerts
                if a["labels"]["alertname"] == "ConntrackTableNearlyFullInNetns" and a["state"] == "firing"}
        assert {"node", "pod-1"} <= full, alerts
        assert any(a["labels"]["alertname"] == "ConntrackDroppingPacketsInNetns" and a["labels"]["netns"] == "node"
                   for a in alerts), alerts

        # every query of the Grafana dashboard answers, with the node and the pod in it
        for title, expr in dashboard_queries(window):
            result = prom.api("query", query=expr)["result"]
            assert result, f"dashboard panel {title!r}: no data for {expr}"
            labels = {r["metric"].get("netns") for r in result}
            if not expr.startswith("max by (instance)"):     # the limit lines have no netns
                assert {"node", "pod-1"} <= labels, (title, expr, labels)
    finally:
        code, err = exporter.stop()
        pid = prom.proc.pid if prom and prom.proc else None
        if prom is not None:
            prom.stop()
    assert code == 0, err
    assert exporter.seen[-1] == "labkit monitor: stopped"
    assert pid is not None and not os.path.exists(f"/proc/{pid}") and not prom.dir.exists()


def _pinned_inodes(pid: int) -> set[int]:
    """The network namespaces the threads of process ``pid`` are in."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(int(re.search(r"\d+", os.readlink(f"/proc/{pid}/task/{tid}/ns/net")).group()))
        except OSError:
            continue
    return out


def test_all_netns_picks_up_new_namespaces_and_drops_removed_ones():
    need_root()
    need_program("ip", "iptables", "unshare")
    name = unique_name("lkp")
    exporter = Exporter("--all-netns", "--rescan", "0.5", "--hz", "4")
    sleepers: list[subprocess.Popen] = []
    try:
        before = exporter.netns_labels()
        assert "init" in before and name not in before

        # a named namespace, with one tracked flow in it
        subprocess.run(["ip", "netns", "add", name], check=True)
        inode = os.stat(f"/run/netns/{name}").st_ino
        subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                        "ip link set lo up && iptables -A OUTPUT -m conntrack --ctstate INVALID -j DROP && "
                        f"{sys.executable} -c \"import socket; socket.socket(socket.AF_INET, "
                        "socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))\""], check=True)
        wait_for(lambda: exporter.scrape().get(("node_nf_conntrack_entries", name)) == 1.0, 10,
                 f"netns {name} with its one entry")
        # a process in it does not make it a second namespace (deduplicated by inode)
        sleepers.append(subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"]))
        # a namespace that only a process has
        sleepers.append(subprocess.Popen(["unshare", "-n", "sleep", "60"]))
        own = os.stat("/proc/self/ns/net").st_ino
        lone = wait_for(lambda: (lambda i: i if i != own else None)(os.stat(f"/proc/{sleepers[1].pid}/ns/net").st_ino),
                        5, "unshare to make its namespace")
        wait_for(lambda: f"netns:{lone}" in exporter.netns_labels(), 10, f"netns:{lone}")
        time.sleep(1.5)                         # a few rescans with the sleeper in the named namespace
        scrape = exporter.scrape()
        assert f"netns:{inode}" not in exporter.netns_labels()
        info = {ns for (metric, ns) in scrape if metric == "labkit_netns_info"}
        assert {name, f"netns:{lone}"} <= info
        assert any(f"+ netns {name} (named, inode {inode})" in line for line in exporter.seen)

        for proc in sleepers:
            proc.terminate()
            proc.wait()
        subprocess.run(["ip", "netns", "del", name], check=True)
        wait_for(lambda: not ({name, f"netns:{lone}"} & exporter.netns_labels()), 10, "both to be dropped")
        # and the exporter no longer holds them (its samplers left them, so the kernel frees them)
        wait_for(lambda: not ({inode, lone} & _pinned_inodes(exporter.proc.pid)), 5, "the samplers to end")
        assert exporter.netns_labels() >= {"init"}
    finally:
        for proc in sleepers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        code, err = exporter.stop()
    assert code == 0, err
    assert any(f"- netns {name} (inode {inode})" in line for line in exporter.seen), exporter.seen
