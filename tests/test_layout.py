"""The shape of the code (issue 18, DESIGN.md section 2): packages follow the mail, imports
point one way (down the layers below, never up), no import circles, no module over ~400
lines, no private name used across modules. Read from the source with `ast`, so it holds
for every module whether a test imports it or not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400

# Lower layers first. A module may import from its own layer and the ones before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the values and rules everything shares
    ("relay.frozen", "relay.types", "relay.errors", "relay.aio", "relay.handoff", "relay.owners",
     "relay.clients",
     "relay.timefmt", "relay.addresses", "relay.config", "relay.tlsutil", "relay.rawmail",
     "relay.compose", "relay.templates", "relay.dkimkeys", "relay.datadir",
     "relay.metrics", "relay.logs", "relay.dnsrecords"),
    ("relay.store",),  # the queue: the only SQL
    ("relay.keys", "relay.submit", "relay.acceptlog"),  # API keys; the one way into the queue
    ("relay.feedback",),  # what comes back: bounces, reports, tracking, webhooks
    ("relay.delivery",),  # scheduler, render, DKIM, outbound SMTP, worker processes
    ("relay.smtp",),  # the listeners (inbound reports go to feedback)
    ("relay.api",),  # the JSON APIs
    # sending domains' management and their DNS checked; the pruner; the wiring (and its
    # lifecycle: health, reload; the front worker processes)
    ("relay.domains", "relay.domaincheck", "relay.retention", "relay.service", "relay.lifecycle",
     "relay.frontworker", "relay.frontworkers"),
    ("relay.cli",),  # the command
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, name, line) for each name imported from the package."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "relay" and not source.startswith("relay."):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                out.append((full if full in MODULES else source, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("relay")]
    return out


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        if module != "relay":
            layer(module)


def test_imports_point_down_the_layers() -> None:
    wrong = [f"{m}:{line} imports {target} (layer {layer(target)} above {layer(m)})"
             for m in MODULES if m != "relay"
             for target, _, line in imports(m) if target != "relay" and layer(target) > layer(m)]
    assert wrong == []


def test_no_import_circles() -> None:
    graph = {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ importing its own modules is how a package is made, not a circle
    for m in graph:
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_private_name_is_used_across_modules() -> None:
    wrong = [f"{m}:{line} imports {name} from {target}" for m in MODULES
             for target, name, line in imports(m)
             if name.startswith("_") and not name.startswith("__")]
    assert wrong == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small(module: str) -> None:
    lines = MODULES[module].read_text("utf-8").count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concern"
