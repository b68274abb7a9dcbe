"""Module structure: only training imports Lightning, the report's numbers need no rendering stack, and
no dad3dlib modules import each other in a cycle (not even through an import deferred into a function)."""
import ast
import subprocess
import sys
from pathlib import Path

import dad3dlib

PACKAGE = Path(dad3dlib.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
LIGHTNING_MODULES = {"train", "lightning_module", "resume"}  # the Trainer, the LightningModule, its checkpoints
RENDERING = {"cv2", "matplotlib", "seaborn", "moderngl", ".render", ".flame", ".viz", ".explorer"}  # figures' stack


def imports(module: str) -> set[str]:
    """The dad3dlib modules ``module`` imports (``from .x import`` and ``from . import x``), at its
    top level or inside a function: an import deferred into a function is still a dependency."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            out |= {n.split(".")[0] for n in names if n.split(".")[0] in MODULES}
    return out


def imported_anywhere(module: str) -> set[str]:
    """Everything ``module`` imports, at module level or inside a function: top-level packages
    ("cv2") and dad3dlib modules with a leading dot (".render")."""
    out = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module else [a.name for a in node.names]
            out |= {"." + n.split(".")[0] for n in names}
    return out


def test_report_reads_numbers_without_the_rendering_stack():
    """report.py (tables, differences, Findings, summary.csv) imports none of the figures' stack, not
    even inside a function (its figures are viz.py's), and importing it loads no OpenCV, matplotlib
    or OpenGL."""
    assert imported_anywhere("report") & RENDERING == set()
    assert {".render", ".flame", "matplotlib", "cv2"} <= imported_anywhere("viz")  # the parser sees them
    script = ("import sys, dad3dlib.report\n"
              "print(sorted({'cv2', 'matplotlib', 'seaborn', 'moderngl', 'dad3dlib.render', 'dad3dlib.viz'} "
              "& set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_only_training_imports_lightning():
    """Importing each module but those of training, one after the other in a fresh interpreter, never loads
    Lightning (evaluation, the report and the study read runs without it)."""
    script = ("import importlib, sys\n"
              f"for m in {sorted(set(MODULES) - LIGHTNING_MODULES)!r}:\n"
              "    importlib.import_module('dad3dlib.' + m)\n"
              "    if 'lightning' in sys.modules or 'lightning.pytorch' in sys.modules:\n"
              "        sys.exit('dad3dlib.' + m + ' imports lightning')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of a directed graph {node: successors} as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return path + [m, n]
            if n not in state and (cycle := visit(n, path + [m])):
                return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            return cycle
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_module_imports_have_no_cycle():
    graph = {m: imports(m) for m in MODULES}
    assert graph["lightning_module"] >= {"model", "losses"} and "evaluate" in graph["finish"]  # the parser sees the edges,
    # those inside functions too
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
