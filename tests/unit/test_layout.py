"""The package's shape, read from its imports (ast): no cycles, and each part imports only the parts
docs/architecture.md allows."""
import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "lorakit"

# The parts, lowest first: a part may import the parts before it, never one after it.
ORDER = ["modules", "families", "precision", "quant", "io", "config", "lora", "memory", "model", "data", "plan",
         "train", "serve", "tools", "cli"]
NEVER = {("serve", "train"), ("train", "serve")}  # the server and the trainer share nothing directly


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every lorakit module `path` imports, at any depth in the file (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {m for m in found if m == "lorakit" or m.startswith("lorakit.")}


def module_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            while imported not in modules and "." in imported:  # `from pkg import name` names a symbol
                imported = imported.rpartition(".")[0]
            if imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def part(module: str) -> str:
    """'lorakit.model.targeting' -> 'model'; the package's __init__ and __main__ (its front door) -> ''."""
    name = module.split(".")[1] if module.count(".") else ""
    return "" if name == "__main__" else name


def test_every_module_belongs_to_a_part():
    assert {part(m) for m in module_graph()} - {""} <= set(ORDER)


def test_every_part_imports_only_the_parts_below_it():
    wrong = [f"{m} ({part(m)}) imports {t} ({part(t)})" for m, targets in module_graph().items() for t in targets
             if part(m) and part(t) and part(t) != part(m)
             and (ORDER.index(part(t)) > ORDER.index(part(m)) or (part(m), part(t)) in NEVER)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = module_graph()
    # a package's __init__ re-exporting its children is not a cycle back into them
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and graph.get(m) is not None)} for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)
