"""The pipeline's channels, checked on the source: data is passed, never smuggled.

No ContextVar carries data between stages; the service never reaches back up into the routes;
only the store layer knows Redis's exceptions; an exception is never changed after it is built.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
# What a GatewayError is given by its constructor, and only there.
_BUILT_WITH = frozenset({"failure", "upstream_headers", "status_code"})


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(APP.parent)): ast.parse(path.read_text(), filename=str(path))
        for path in sorted(APP.rglob("*.py"))
    }


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_layering_no_context_variable_carries_data() -> None:
    found = [
        path
        for path, tree in _modules().items()
        if any(name.startswith("contextvars") for name in _imports(tree))
    ]
    assert found == []


def test_layering_the_service_never_imports_the_routes() -> None:
    found = {
        path: sorted(name for name in _imports(tree) if name.startswith("app.api"))
        for path, tree in _modules().items()
        if path.startswith("app/service/")
    }
    assert found and all(not names for names in found.values())


def test_layering_only_the_store_seam_knows_redis_exceptions() -> None:
    knows = {
        path
        for path, tree in _modules().items()
        if any(name.startswith("redis.exceptions") for name in _imports(tree))
    }
    # The translation every store uses, and the client factory (it configures which errors
    # redis-py itself retries).
    assert knows == {"app/shared_state/failures.py", "app/shared_state/factory.py"}


def test_layering_errors_are_never_changed_after_they_are_built() -> None:
    changed: list[str] = []
    for path, tree in _modules().items():
        for node in ast.walk(tree):
            for target in node.targets if isinstance(node, ast.Assign) else []:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute):
                    # error.headers["x-should-retry"] = ...
                    attribute, named = target.value, {"headers"}
                elif isinstance(target, ast.Attribute):
                    attribute, named = target, _BUILT_WITH
                else:
                    continue
                owner = attribute.value
                if attribute.attr in named and not (
                    isinstance(owner, ast.Name) and owner.id in {"self", "clone"}
                ):
                    changed.append(f"{path}:{node.lineno} {ast.unparse(target)}")
    assert changed == []


# The pipeline, top to bottom: api -> service -> intake -> cache -> routing -> upstream. A stage
# may use the stages below it; none may import a stage above it, except intake's validated
# EditRequest, which is the value every later stage is handed.
_PIPELINE = ("api", "service", "intake", "cache", "routing", "upstream")
_ABOVE = {
    stage: tuple(upper for upper in _PIPELINE[: _PIPELINE.index(stage)] if upper != "intake")
    for stage in _PIPELINE
}


def test_layering_no_pipeline_stage_imports_a_stage_above_it() -> None:
    reaching_up = {
        f"{path} -> {name}"
        for path, tree in _modules().items()
        for stage, above in _ABOVE.items()
        if path.startswith(f"app/{stage}/")
        for name in _imports(tree)
        if any(name == f"app.{upper}" or name.startswith(f"app.{upper}.") for upper in above)
    }
    assert reaching_up == set()


def test_layering_app_top_level_is_the_composition_root_only() -> None:
    modules = sorted(path.name for path in APP.glob("*.py"))
    assert modules == ["__init__.py", "cli.py", "errors.py", "main.py", "wiring.py"]
    packages = sorted(path.parent.name for path in APP.glob("*/__init__.py"))
    undocumented = [
        name
        for name in packages
        if ast.get_docstring(ast.parse((APP / name / "__init__.py").read_text())) is None
    ]
    assert undocumented == []
