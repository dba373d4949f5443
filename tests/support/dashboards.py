"""The PromQL the shipped dashboards and alert rules run, as Prometheus would receive it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import promql_parser
import yaml

from tests.support.constants import REPO

DASHBOARDS = sorted((REPO / "config" / "grafana" / "dashboards").glob("*.json"))
ALERTS = REPO / "config" / "prometheus-alerts.yml"
COMPARISONS = frozenset({"==", "!=", ">", "<", ">=", "<="})
SET_OPERATORS = frozenset({"and", "or", "unless"})


def dashboard_targets(variables: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(where, expr) for every panel target, Grafana's `$variables` replaced from `variables`
    (longest name first, so `$__rate_interval` is not read as `$__rate`)."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name in sorted(variables, key=len, reverse=True):
                    expr = expr.replace(name, variables[name])
                assert "$" not in expr, f"{path.name}: {panel['title']}: unknown variable: {expr}"
                yield f"{path.name}: {panel['title']} ({target['refId']})", expr


def alert_rules() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], rule["expr"]


def watched_quantities(expr: str) -> list[str]:
    """What an alert compares with its threshold: `X > 0.05` watches X, `A == 0 and B > 0`
    watches A and B. Quiet, the alert itself returns nothing; the quantities must still exist
    (at 0), or the alert could never fire."""

    def split(node: Any) -> list[Any]:
        if isinstance(node, promql_parser.ParenExpr):
            return split(node.expr)
        if isinstance(node, promql_parser.BinaryExpr):
            op = str(node.op)
            returns_bool = node.modifier is not None and node.modifier.return_bool
            if op in SET_OPERATORS:
                return [*split(node.lhs), *split(node.rhs)]
            if op in COMPARISONS and not returns_bool:
                if isinstance(node.rhs, promql_parser.NumberLiteral):
                    return split(node.lhs)
                if isinstance(node.lhs, promql_parser.NumberLiteral):
                    return split(node.rhs)
        return [node]

    return [str(node) for node in split(promql_parser.parse(expr))]
