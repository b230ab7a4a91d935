"""The pack's import graph: which modules the nodes reach, import circles, imports against the layers.

Every import statement counts, deferred ones inside functions included, so a circle cannot hide
behind a function-level import. ``python -m lab.layering`` prints the figures the layering test
guards (tests/unit/test_layering.py) and the size of the pack and the lab.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui_accel"
NOT_CODE = {"tests", "scripts", "docs", "example_workflows", "out"}

# Top-level packages and modules of the pack, bottom layer first. A module may import its own
# package and anything in a lower layer, never sideways or upward; the lab sits above the pack,
# and inside the lab the benchmarks sit above the harness they use.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"kernels", "metrics", "files", "runs", "compat", "families"}),
    frozenset({"quant", "vq", "cache", "attention"}),
    frozenset({"nodes"}),
    frozenset({""}),                    # the package root: ComfyUI's entry point
    frozenset({"lab"}),
    frozenset({"lab.bench"}),
)


def modules(repo: Path = REPO) -> dict[str, Path]:
    """Dotted name (pack-relative; lab modules start with ``lab``) -> file."""
    found = {}
    for path in repo.rglob("*.py"):
        rel = path.relative_to(repo)
        if rel.parts[0] in NOT_CODE or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _absolute(name: str) -> str | None:
    """An absolute import's target in our naming, None when it is not ours."""
    if name == PACK or name.startswith(PACK + "."):
        return name[len(PACK) + 1:]
    if name == "lab" or name.startswith("lab."):
        return name
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name.split(".") if name else []
    if path.name != "__init__.py":
        package = package[:-1]
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets += [t for t in (_absolute(a.name) for a in node.names) if t is not None]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = _absolute(node.module or "")
                if module is None:
                    continue
            # ``from x import y`` imports the submodule x.y when there is one.
            targets += [f"{module}.{a.name}".strip(".") if f"{module}.{a.name}".strip(".") in known
                        else module for a in node.names]
    found = set()
    for target in targets:
        while target not in known and target:
            target = target.rpartition(".")[0]
        if target in known and target != name:
            found.add(target)
    return found


def import_graph(repo: Path = REPO) -> dict[str, set[str]]:
    known = modules(repo)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def reachable(graph: dict[str, set[str]], roots) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph[name])
    return seen


def pack_modules(graph: dict[str, set[str]]) -> set[str]:
    """What ComfyUI loads: every module the package root and the node layer reach."""
    return reachable(graph, [m for m in graph if m == "" or m == "nodes" or m.startswith("nodes.")])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter; counter += 1
        stack.append(start); on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter; counter += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop(); on_stack.discard(member); group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def layer_of(name: str) -> tuple[int, str]:
    """(layer, top-level package) of a module."""
    top = "lab.bench" if name == "lab.bench" or name.startswith("lab.bench.") else name.split(".")[0]
    for layer, members in enumerate(LAYERS):
        if top in members:
            return layer, top
    raise KeyError(f"{name!r} is in no layer; add its top-level package to LAYERS in lab/layering.py")


def layer_breaks(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs that import sideways or upward."""
    breaks = []
    for name, targets in graph.items():
        layer, top = layer_of(name)
        for target in targets:
            target_layer, target_top = layer_of(target)
            if target_top != top and target_layer >= layer:
                breaks.append((name, target))
    return sorted(breaks)


def nonblank_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def main() -> None:
    known = modules()
    graph = import_graph()
    pack = pack_modules(graph)
    lab = set(graph) - pack
    print(f"pack: {len(pack)} modules, {sum(nonblank_lines(known[m]) for m in pack)} non-blank lines")
    print(f"lab:  {len(lab)} modules, {sum(nonblank_lines(known[m]) for m in lab)} non-blank lines")
    print(f"lab modules the nodes reach: {sorted(m for m in pack if m.startswith('lab'))}")
    print(f"import circles: {circles(graph)}")
    print(f"sideways or upward imports: {layer_breaks(graph)}")


if __name__ == "__main__":
    main()
