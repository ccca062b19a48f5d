"""The Grafana dashboard in examples/ loads as JSON and asks only for metrics we export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmc_connector.control.controller.histogram import KindHistogram
from lmc_connector.control.controller.metrics import build_registry
from lmc_connector.control.controller.state import ControllerState
from lmc_connector.v1.stats import exported_metric_names

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana_dashboard.json"
#: Metric names as PromQL spells them: ours, and the controller's process metrics.
METRIC = re.compile(r"\b(?:vllm:lmc_|lmc_controller_|process_)[A-Za-z0-9_:]*")
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}


def controller_metric_names() -> set[str]:
    """Every sample name the controller's /metrics can expose (from the families' types)."""
    registry = build_registry(ControllerState(), KindHistogram())
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, [""]))
    return names


def queries(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for value in node.values() for q in queries(value)]
    if isinstance(node, list):
        return [q for value in node for q in queries(value)]
    return []


def test_every_panel_query_names_metrics_the_connector_or_controller_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = controller_metric_names() | set(exported_metric_names())
    exprs = queries(dashboard["panels"])
    assert len(exprs) >= 20
    for expr in exprs:
        named = METRIC.findall(expr)
        assert named, f"query names none of our metrics: {expr}"
        unknown = set(named) - exported
        assert not unknown, f"{expr} asks for metrics nobody exports: {sorted(unknown)}"


def test_template_variables_query_exported_metrics_too() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = controller_metric_names() | set(exported_metric_names())
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert variables
    for variable in variables:
        assert set(METRIC.findall(variable["query"])) <= exported, variable["query"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
