"""The package's shape: collective mappings live in one module, and no import runs in a circle."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import cai_labs

SRC = Path(cai_labs.__file__).parent

#: Autograd functions that compute *and* communicate, with a backward of their own (not a
#: pair of collectives): they call the plain collectives of ``cai_labs.comm``.
RING = "sequence_parallel/ring_attention.py"
FLASH = "sequence_parallel/ring_flash.py"
COMPUTE_KERNELS = {
    "tensor_parallel/layers_2d.py": {"_Summa"},
    "tensor_parallel/layers_3d.py": {"_Linear3D"},
    "tensor_parallel/cross_entropy.py": {"_VocabParallelCrossEntropy"},
    "auto_parallel/runtime.py": {"_SyncBN"},
    # Megatron's sequence-parallel column linear: all-gathers its input shard in forward and
    # again in backward (for dW), so that only the shard is saved; reduce-scatters dX.
    "tensor_parallel/sequence_parallel_1d.py": {"_GatherLinear"},
    # The ring passes: point-to-point rings whose backward is a ring pass plus a ring reduce.
    RING: {"RingQK", "RingAV"},
    # Online-softmax ring: forward and backward each a ring pass, backward also a ring reduce.
    FLASH: {"RingFlashAttention"},
}
RING_PASSES = {(RING, "RingQK"), (RING, "RingAV"), (FLASH, "RingFlashAttention")}


def _is_function_subclass(node: ast.ClassDef) -> bool:
    return any(ast.unparse(b).endswith("autograd.Function") for b in node.bases)


def _dotted(node: ast.AST) -> str:
    return ast.unparse(node) if isinstance(node, ast.Attribute | ast.Name) else ""


def _distributed_aliases(tree: ast.Module) -> set[str]:
    """Names under which a module refers to ``torch.distributed`` (``dist``, ...)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def _calls_distributed(body: ast.AST, aliases: set[str], helpers: dict[str, ast.AST]) -> bool:
    """Whether ``body`` calls ``torch.distributed.<op>``, directly or through a module-level
    helper of the same file."""
    seen: set[str] = set()
    todo = [body]
    while todo:
        for node in ast.walk(todo.pop()):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if any(name.startswith(a + ".") for a in aliases):
                return True
            if name in helpers and name not in seen:
                seen.add(name)
                todo.append(helpers[name])
    return False


def _autograd_functions() -> list[tuple[str, str, bool]]:
    """``(file, class, calls torch.distributed)`` for every ``autograd.Function`` in src."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = _distributed_aliases(tree)
        helpers = {
            n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and _is_function_subclass(node):
                out.append((rel, node.name, _calls_distributed(node, aliases, helpers)))
    return out


def test_collective_pairs_come_from_the_mappings_module():
    found = _autograd_functions()
    assert {c for _, c, _ in found} >= {"_Mapping", "_Summa", "RingQK"}  # the scan sees them
    outside = [(f, c, d) for f, c, d in found if f != "comm.py"]
    calling = [(f, c) for f, c, d in outside if d and (f, c) not in RING_PASSES]
    assert not calling, f"autograd functions calling torch.distributed outside comm.py: {calling}"
    unknown = [(f, c) for f, c, _ in outside if c not in COMPUTE_KERNELS.get(f, set())]
    assert not unknown, (
        f"new autograd functions {unknown}: write a pair of collectives as a mapping of "
        "cai_labs.comm; a kernel that also computes goes into COMPUTE_KERNELS with its reason"
    )


def test_the_scan_catches_a_hand_written_pair(tmp_path):
    # The check above can fail: a hand-written all-reduce pair is seen as calling torch.distributed.
    code = (
        "import torch\nimport torch.distributed as dist\n\n"
        "def _sum(x):\n    dist.all_reduce(x)\n    return x\n\n"
        "class Pair(torch.autograd.Function):\n"
        "    @staticmethod\n    def forward(ctx, x):\n        return x\n"
        "    @staticmethod\n    def backward(ctx, g):\n        return _sum(g)\n"
    )
    tree = ast.parse(code)
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    assert _is_function_subclass(cls)
    assert _calls_distributed(cls, _distributed_aliases(tree), helpers)


def _imports_of(path: Path) -> set[str]:
    """``cai_labs`` modules that ``path`` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cai_labs"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cai_labs")}
    return out


def _module_graph() -> dict[str, set[str]]:
    names = {m.name for m in pkgutil.walk_packages([str(SRC)], "cai_labs.")} | {"cai_labs"}
    graph = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        deps = _imports_of(Path(spec.origin)) & names
        graph[name] = {d for d in deps if d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _strip_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges into a package's ``__init__`` from its own submodules (a re-export, not a
    dependency of the package on itself)."""
    return {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}


def test_no_module_imports_in_a_circle():
    cycle = _cycle(_strip_packages(_module_graph()))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_grid_mode_has_one_registered_mode():
    from cai_labs.tensor_parallel.grid import MODES
    from cai_labs.tensor_parallel.modes import TP_MODES

    assert tuple(TP_MODES) == MODES
    assert len({id(m.layers) for m in TP_MODES.values()}) == len(MODES)  # one module each
