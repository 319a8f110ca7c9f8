"""The server↔trainer contract: ``server`` imports nothing from ``trainer`` but
``trainer.contract``, the three packages import each other one way only (no cycle, between the
packages or between their modules, imports for type hints included), and the contract loads no
training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "trainer", "adapters_store")
CONTRACT = "trainer.contract"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(tree: ast.Module) -> Iterator[ast.AST]:
    """The statements that are not inside a function or class: what a reader of the module's
    head sees, ``if TYPE_CHECKING:`` blocks included."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If | ast.Try):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]


def _imports(path: Path, *, scope: str = "anywhere") -> Iterator[tuple[int, str]]:
    """(line, module) for the file's imports: ``anywhere`` (inside functions too), ``module``
    (module level, ``TYPE_CHECKING`` blocks included: imports for type hints count as coupling)
    or ``import-time`` (only what runs when the module is imported)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes: list[ast.AST] = {
        "anywhere": lambda: list(ast.walk(tree)),
        "module": lambda: list(_module_level(tree)),
        "import-time": lambda: list(tree.body),
    }[scope]()
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if "." in base:  # `from trainer import auto` imports trainer.auto, named below
                yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "weights" not in p.parts)


def _is_trainer(module: str) -> bool:
    return module == "trainer" or module.startswith("trainer.")


def test_the_server_imports_only_the_trainer_contract() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _sources("server")
        for line, module in _imports(path)
        if _is_trainer(module) and not module.startswith(CONTRACT)
    ]
    assert offending == [], "server imports trainer code outside the contract"


def _package_edges() -> set[tuple[str, str]]:
    return {
        (package, module.split(".")[0])
        for package in PACKAGES
        for path in _sources(package)
        for _, module in _imports(path)
        if module.split(".")[0] in PACKAGES and module.split(".")[0] != package
    }


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as a path, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(edges.get(node, ())):
            if state.get(succ) == 1:
                return [*path[path.index(succ) :], succ]
            if succ not in state and (found := visit(succ)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_packages_import_one_way_with_no_cycle() -> None:
    edges = _package_edges()
    assert edges <= {("server", "trainer"), ("server", "adapters_store"), ("trainer", "adapters_store")}, (
        edges
    )
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    assert _cycle(graph) is None


def _module_graph(scope: str) -> dict[str, set[str]]:
    known = {_module_name(p) for package in PACKAGES for p in _sources(package)}
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in _sources(package):
            name = _module_name(path)
            # a package importing its own submodule names itself as `from` base: not an edge
            graph[name] = {m for _, m in _imports(path, scope=scope) if m in known and m != name}
    return graph


@pytest.mark.parametrize("scope", ["import-time", "module", "anywhere"])
def test_no_import_cycle_between_modules(scope: str) -> None:
    """Module by module, counting what runs at import time, then also the imports made only for
    type hints, then also those deferred into functions (a cycle there is still two modules that
    each need the other; deferring an import hides it from Python, not from a reader)."""
    graph = _module_graph(scope)
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def _loaded_after_import(module: str) -> set[str]:
    script = f"import sys\nimport {module}\nprint(' '.join(sys.modules))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(run.stdout.split())


def test_the_contract_loads_no_training_code() -> None:
    """No contract module loads transformers, PEFT, vLLM or the trainer's training modules; only
    admission (which reads the store through ``adapters_store``) loads torch."""
    training = ("trainer.worker", "trainer.loop", "trainer.publish", "trainer.methods.parametrizations")
    for module in [_module_name(p) for p in _sources("trainer") if _module_name(p).startswith(CONTRACT)]:
        loaded = _loaded_after_import(module)
        assert not loaded & {"transformers", "peft", "vllm"}, module
        assert not [m for m in loaded if m.startswith(training)], module
        if module != f"{CONTRACT}.admission":
            assert "torch" not in loaded, module
