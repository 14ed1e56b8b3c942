"""docs/monitor.md's Prometheus pieces: the scrape config, the alert rules and the Grafana dashboard.

They must be what a user can load as is: valid files, only metrics the exporter
serves, the same job name throughout, and the snippets in the page the same as the files.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import need_program
from tests.unit.test_monitor_exporter import lab_snapshot, scrape

DOCS = Path(__file__).resolve().parents[2] / "docs"
CONFIG = DOCS / "prometheus/prometheus.yml"
RULES = DOCS / "prometheus/conntrack-rules.yml"
DASHBOARD = DOCS / "grafana/conntrack-netns-dashboard.json"
METRIC = re.compile(r"\b((?:node_nf_conntrack|labkit)_[a-z_]+)\b")


def served() -> set[str]:
    """Every sample name a scrape of the exporter has."""
    return set(scrape(lab_snapshot()))


def test_the_dashboard_is_json_grafana_can_import():
    board = json.loads(DASHBOARD.read_text())
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    ds = "${" + board["__inputs"][0]["name"] + "}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) >= 4
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"job", "instance", "netns"}
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == ds and panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}


def test_the_dashboard_shows_entries_against_the_limit_and_drops_per_second():
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert any(e.startswith("node_nf_conntrack_entries{") for e in exprs)
    assert any("node_nf_conntrack_entries_limit" in e for e in exprs)
    assert any(e.startswith("rate(node_nf_conntrack_stat_drop{") for e in exprs)


def test_the_dashboard_and_the_rules_use_only_metrics_the_exporter_serves():
    names = served()
    board = json.loads(DASHBOARD.read_text())
    used = {m for p in board["panels"] for t in p["targets"] for m in METRIC.findall(t["expr"])}
    used |= {m for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
             for m in METRIC.findall(r["expr"])}
    assert used and used <= names, used - names


def test_the_rules_select_the_scrape_configs_job():
    job = yaml.safe_load(CONFIG.read_text())["scrape_configs"][0]["job_name"]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert f'job="{job}"' in rule["expr"], rule["alert"]
    assert RULES.name in yaml.safe_load(CONFIG.read_text())["rule_files"]


def yaml_blocks(text: str) -> list:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_the_snippets_in_monitor_md_are_the_files():
    blocks = yaml_blocks((DOCS / "monitor.md").read_text())
    config = yaml.safe_load(CONFIG.read_text())
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {"scrape_configs": config["scrape_configs"]} in blocks
    assert [rules[0]] in blocks


def test_promtool_accepts_the_config_and_the_rules():
    need_program("promtool")
    for argv in (["check", "config", str(CONFIG)], ["check", "rules", str(RULES)]):
        res = subprocess.run(["promtool", *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
