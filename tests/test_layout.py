"""The package layout: no import cycles, and each room imports only what docs/DESIGN-NOTES.md ("Layout") allows.

The table in the docs is the one source: this test parses it, so the docs and the code cannot drift apart.
Every `import` counts, module-level or inside a function. Imports inside functions are kept for the libraries the
Layout section names (slow to import and rarely used, or optional), and only for them.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ecomla"


def rooms_table() -> dict[str, set[str]]:
    """{room: rooms it may import} from the Layout table of docs/DESIGN-NOTES.md."""
    text = (ROOT / "docs" / "DESIGN-NOTES.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rooms = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`").removeprefix("ecomla/").removesuffix(".py").rstrip("/")
        rooms[room] = set(re.findall(r"`([\w_]+)`", cells[2]))
    return rooms


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The ecomla modules a file imports (resolved to the deepest module that exists)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from . import x` names submodules; `from .x import y` imports module x (y may be a submodule)
            targets = [f"{base}.{a.name}" for a in node.names] + ([base] if node.module else [])
        else:
            continue
        for t in targets:
            if t.split(".")[0] != "ecomla":
                continue
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                found.add(t)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
LAZY = ("lm_eval", "trl", "matplotlib", "triton", "torch.utils.tensorboard")  # the Layout section's list


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ecomla"


def test_every_room_is_in_the_layout_table_and_imports_only_what_it_may():
    table = rooms_table()
    assert table, "docs/DESIGN-NOTES.md has no Layout table"
    missing = {room(m) for m in MODULES} - set(table) - {"ecomla"}
    assert not missing, f"rooms missing from the Layout table in docs/DESIGN-NOTES.md: {sorted(missing)}"
    bad = []
    for mod, path in MODULES.items():
        here = room(mod)
        for dep in imports(path):
            there = room(dep)
            if there != here and here != "ecomla" and there not in table[here]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "imports the Layout table does not allow:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = {m: imports(p) for m, p in MODULES.items()}
    graph = {m: {d for d in deps if d != "ecomla"} for m, deps in graph.items()}  # the package root re-exports
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_inside_functions_are_only_the_slow_or_optional_libraries():
    local = []
    for mod, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    local += [(mod, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):  # relative: ".name", e.g. the Triton kernel module
                    local.append((mod, node.module if not node.level else "." + (node.module or node.names[0].name)))
    triton_module = ("ecomla.kernels.mla_decode", ".triton_mla")  # imports triton
    bad = [(m, n) for m, n in local if not n.startswith(LAZY) and (m, n) != triton_module]
    assert not bad, f"move these imports to the top of their module: {bad}"


OUTSIDE = ("benchmarks", "tools", "tests")  # scripts and tests import ecomla, never the other way round


def outside_imports(path: Path) -> set[str]:
    """The modules of benchmarks/, tools/ or tests/ a file imports (module-level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in OUTSIDE}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in OUTSIDE:
            found.add(node.module)
    return found


def test_ecomla_never_imports_benchmarks_tools_or_tests(tmp_path):
    bad = {mod: outside_imports(path) for mod, path in MODULES.items() if outside_imports(path)}
    assert not bad, f"ecomla imports scripts or tests: {bad}"
    probe = tmp_path / "probe.py"  # the check sees both forms, at module level and inside a function
    probe.write_text("import benchmarks.study\nimport ecomla.io\ndef f():\n    from tools.record import write_record\n")
    assert outside_imports(probe) == {"benchmarks.study", "tools.record"}


def test_benchmarks_and_tools_are_scripts_that_open_with_their_usage():
    """benchmarks/ holds scripts that print measurements, tools/ developer tools: each one runnable, its docstring
    (or, for a shell script, its header comment) showing the command that runs it."""
    scripts = [p for folder in ("benchmarks", "tools") for p in sorted((ROOT / folder).glob("*"))
               if p.suffix in (".py", ".sh") and p.name != "__init__.py"]
    assert len(scripts) > 10
    for p in scripts:
        rel = p.relative_to(ROOT).as_posix()
        text = p.read_text()
        if p.suffix == ".sh":
            head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
            assert f"bash {rel}" in head, f"{rel}: no usage line (`bash {rel} ...`) in its header comment"
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert re.search(rf"^\s*(\S+=\S+ )*python {re.escape(rel)}\b", doc, re.M), \
            f"{rel}: its docstring shows no usage line (`python {rel} ...`)"
        assert 'if __name__ == "__main__":' in text, f"{rel} is not a script"
