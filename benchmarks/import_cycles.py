"""Import cycles among the package's modules, counted from the source.

The graph: one node per module of fused_optim/ and kernels/ (kernels/ installs
as fused_optim.kernels), one edge per module another imports, at the top level
or inside a function (``import``, ``from ... import``, and
``importlib.import_module("...")`` with a literal name). ``from pkg import sub``
is an edge to the submodule, not the package. Prints the counts and every
strongly connected component of more than one module (a cycle).

    python benchmarks/import_cycles.py [REV]   # REV: a commit (default: the work tree)
"""

from __future__ import annotations

import ast
import subprocess
import sys

ROOTS = ("fused_optim", "kernels")


def _git(*args) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def sources(rev=None) -> dict:
    """{module name: (source text, is a package)} of the tracked .py files."""
    if rev:
        paths = _git("ls-tree", "-r", "--name-only", rev, "--", *ROOTS).split()
    else:
        paths = _git("ls-files", "--", *ROOTS).split()
    out = {}
    for path in (p for p in paths if p.endswith(".py")):
        parts = path[:-3].split("/")
        if parts[0] == "kernels":
            parts.insert(0, "fused_optim")
        ispkg = parts[-1] == "__init__"
        if ispkg:
            parts.pop()
        text = _git("show", f"{rev}:{path}") if rev else open(path, encoding="utf-8").read()
        out[".".join(parts)] = (text, ispkg)
    return out


def graph(mods: dict) -> dict:
    def known(name):  # the longest prefix that is one of our modules
        if name.startswith("kernels"):
            name = "fused_optim." + name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for m, (text, ispkg) in mods.items():
        pkg = m if ispkg else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(text)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.startswith("kernels"):
                    base = "fused_optim." + base
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            elif (isinstance(node, ast.Call) and node.args
                  and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                  and isinstance(node.args[0], ast.Constant)):
                targets = [node.args[0].value]
            for t in targets:
                t = known(t)
                if t and t != m:
                    edges[m].add(t)
    return edges


def cycles(edges: dict) -> list:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    mods = sources(argv[0] if argv else None)
    edges = graph(mods)
    found = cycles(edges)
    print(f"{len(mods)} modules, {sum(map(len, edges.values()))} import edges, "
          f"{len(found)} cycles, {sum(map(len, found))} modules in them")
    for comp in found:
        print(f"  {len(comp)}: " + " ".join(c.removeprefix("fused_optim.") or c for c in comp))


if __name__ == "__main__":
    main()
