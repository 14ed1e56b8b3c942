"""A real Prometheus server for the exporter's tests, started and stopped by the tests.

``PrometheusServer`` runs Debian's ``prometheus`` on 127.0.0.1 and a free port,
with its own config and data directory in a temp folder, and records its pid in
a pid file there; :meth:`PrometheusServer.stop` ends exactly that process and
removes the folder.  Nothing of the machine's own Prometheus set-up is read or
changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.integration.conftest import free_port


class PrometheusServer:
    """One throw-away Prometheus on loopback, scraping every ``interval`` seconds.

    Args:
        config: the configuration (a dict as prometheus.yml holds it); its
            ``global`` scrape and evaluation intervals are set to ``interval``.
        rule_files: rule files copied beside the config (named in ``config``'s ``rule_files``).
        interval: seconds between scrapes and rule evaluations.
    """

    def __init__(self, config: dict, rule_files: tuple[Path, ...] = (), interval: float = 1.0):
        self.dir = Path(tempfile.mkdtemp(prefix="lkt-prometheus-"))
        config = dict(config)
        config["global"] = dict(config.get("global") or {}, scrape_interval=f"{interval:g}s",
                                evaluation_interval=f"{interval:g}s")
        for path in rule_files:
            shutil.copy(path, self.dir / Path(path).name)
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.pid_file = self.dir / "prometheus.pid"
        self.log = self.dir / "prometheus.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "PrometheusServer":
        """Start it and wait until it is ready (its port taken meanwhile: another port)."""
        for _ in range(3):
            self.port = free_port()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                    stdout=log, stderr=log, cwd=self.dir, start_new_session=True)
            self.pid_file.write_text(f"{self.proc.pid}\n")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                        if resp.status == 200:
                            return self
                except OSError:
                    time.sleep(0.1)
            self.stop(remove=False)
        raise RuntimeError(f"prometheus did not start; its log:\n{self.log.read_text()}")

    def api(self, path: str, **params: str) -> dict | list:
        """GET ``/api/v1/<path>`` and return its ``data``.

        Raises:
            RuntimeError: the API answered with an error.
        """
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """Evaluate ``expr`` now; return ``{netns label: value}`` of the resulting vector."""
        data = self.api("query", query=expr)
        return {r["metric"].get("netns", ""): float(r["value"][1]) for r in data["result"]}

    def stop(self, remove: bool = True) -> None:
        """Stop the process of the pid file (SIGTERM, then SIGKILL) and remove the folder."""
        if self.proc is not None and self.pid_file.exists():
            pid = int(self.pid_file.read_text())
            if self.proc.poll() is None and pid == self.proc.pid:
                os.kill(pid, signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(pid, signal.SIGKILL)
                    self.proc.wait()
            self.pid_file.unlink()
        self.proc = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
