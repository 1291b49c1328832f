"""The observability artifacts under ops/ as the tests read them: the dashboard's queries, the
alert rules, and the few PromQL facts the tests need (which metrics an expression selects, which
signals an alert compares with which threshold).

No PromQL parser is needed because the artifacts keep to two conventions, which the unit tests
enforce: every metric selector has braces (`name{...}`), and every alert expression is one or more
`<signal> <comparison> <number>` operands joined by `and`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "ops" / "prometheus"
GRAFANA_DIR = ROOT / "ops" / "grafana"
DASHBOARD_PATH = GRAFANA_DIR / "dashboards" / "clickpulse.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
_TRAILING_COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)\s*$")
_SET_OPERATOR = re.compile(r"\s(and|or|unless)(\s+(?:on|ignoring)\s*\([^)]*\))?\s")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text())


def dashboard_generator() -> ModuleType:
    path = GRAFANA_DIR / "generate_dashboard.py"
    spec = importlib.util.spec_from_file_location("generate_dashboard", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    expr: str


def dashboard_queries(board: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replaces Grafana's `$name` and `${name}` variables, longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def selected_metrics(expr: str) -> set[str]:
    """Metric names of every `name{...}` selector in the expression."""
    return set(_SELECTOR.findall(expr))


def registered_name(selected: str, histograms: set[str]) -> str:
    """The registry name behind a selected series name (`x_bucket` → `x` for a histogram x)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if selected.endswith(suffix) and selected[: -len(suffix)] in histograms:
            return selected[: -len(suffix)]
    return selected


@dataclass(frozen=True)
class Comparison:
    signal: str
    operator: str
    threshold: float


def alert_comparisons(expr: str) -> list[Comparison]:
    """Splits `a > 1 and on (x) b == 0` into its compared signals; fails on any other shape."""
    comparisons = []
    for operand in _split_top_level(" ".join(expr.split())):
        match = _TRAILING_COMPARISON.search(operand)
        assert match, f"alert operand without a literal threshold: {operand!r}"
        comparisons.append(Comparison(operand[: match.start()].strip(), match.group(1), float(match.group(2))))
    return comparisons


def _split_top_level(expr: str) -> list[str]:
    """Splits on set operators (and, or, unless) outside parentheses, braces and strings."""
    operands, start, depth, quote, index = [], 0, 0, "", 0
    while index < len(expr):
        char = expr[index]
        if quote:
            quote = "" if char == quote and expr[index - 1] != "\\" else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := _SET_OPERATOR.match(expr, index)):
            operands.append(expr[start:index].strip())
            start = index = match.end()
            continue
        index += 1
    operands.append(expr[start:].strip())
    return operands
