"""Check the Colossal-AI code shown on the site against the installed release, without a GPU.

A *snippet* is a top-level function of a tutorial that imports ``colossalai`` (the page shows it
as code, and runs it where it can), or a ``colossalai_*.py`` file that a docs page includes. For
each one the check

* runs pyflakes over the file and keeps the messages inside the snippet (undefined names,
  unused imports: code that cannot run as shown);
* imports every module and name the snippet imports (a removed or renamed API fails here);
* binds every call whose callee it can resolve, to ``inspect.signature(callee)`` (a wrong or
  removed keyword fails here). Callees are resolved from the imports, and from variables
  assigned the result of calling a class (``booster = Booster(...)`` makes ``booster.boost``
  resolvable), which is where most Colossal-AI calls go;
* resolves every dotted ``colossalai.…`` name that the prose of a page writes in double
  backquotes.

``python -m cai_labs.colossal.check`` checks the whole site and prints what it counted.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Snippet",
    "Result",
    "find_snippets",
    "check_snippet",
    "check_source",
    "check_names",
    "check_site",
    "checked_here",
]

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("colossalai", "lightning_colossalai")
NAME_RE = re.compile(r"``(colossalai(?:\.\w+)+)``")
# Names a page cites as gone from 0.5.0 (what lightning-colossalai 0.1.0 imports): the check
# asserts that they really do not resolve.
REMOVED = frozenset(
    {"colossalai.core", "colossalai.nn.parallel.GeminiDDP", "colossalai.zero.ZeroOptimizer"}
)


@dataclass(frozen=True)
class Snippet:
    """One snippet: the file it lives in and its line range there (1-based, inclusive)."""

    path: Path
    name: str
    first: int
    last: int

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.name}"


@dataclass
class Result:
    """What the check found: problems (empty = pass) and what it counted."""

    problems: list[str] = field(default_factory=list)
    imports: int = 0
    calls: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Instance:
    """A variable known to hold an instance of ``cls`` (assigned from ``cls(...)``)."""

    cls: type


def _imports_colossalai(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in sub.names):
            return True
        if isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] in PACKAGES:
            return True
    return False


def _snippets_in(path: Path) -> Iterator[Snippet]:
    tree = ast.parse(path.read_text(), str(path))
    if path.name.startswith("colossalai_"):
        yield Snippet(path, path.stem, 1, len(path.read_text().splitlines()))
        return
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and _imports_colossalai(node):
            yield Snippet(path, node.name, node.lineno, node.end_lineno or node.lineno)


def find_snippets(root: Path = ROOT) -> list[Snippet]:
    """Every Colossal-AI snippet of the site: tutorial functions and included snippet files."""
    files = sorted((root / "tutorials").glob("tutorial_*.py"))
    files += sorted((root / "docs").rglob("colossalai_*.py"))
    return [s for f in files for s in _snippets_in(f)]


def _pyflakes(source: str, filename: str) -> list[tuple[int, str]]:
    from pyflakes.api import check
    from pyflakes.reporter import Reporter

    class _Collect(Reporter):
        def __init__(self) -> None:
            self.found: list[tuple[int, str]] = []

        def flake(self, message: Any) -> None:
            self.found.append((message.lineno, message.message % message.message_args))

        def syntaxError(  # noqa: N802
            self,
            filename: str,
            msg: str,
            lineno: int | None,
            offset: int | None,
            text: str | None,
        ) -> None:
            self.found.append((lineno or 0, f"syntax error: {msg}"))

        def unexpectedError(self, filename: str, msg: object) -> None:  # noqa: N802
            self.found.append((0, str(msg)))

    reporter = _Collect()
    check(source, filename, reporter)
    return reporter.found


def _resolve_import(module: str, name: str | None) -> Any:
    """Import ``module`` (and ``name`` from it, as an attribute or a submodule)."""
    mod = importlib.import_module(module)
    if name is None:
        return mod
    if hasattr(mod, name):
        return getattr(mod, name)
    return importlib.import_module(f"{module}.{name}")


class _Checker(ast.NodeVisitor):
    """Walks one snippet: resolves imports, tracks instances, binds calls."""

    def __init__(self, result: Result) -> None:
        self.result = result
        self.env: dict[str, Any] = {}

    def problem(self, node: ast.AST, text: str) -> None:
        self.result.problems.append(f"line {getattr(node, 'lineno', '?')}: {text}")

    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            try:
                mod = importlib.import_module(alias.name)
            except Exception as exc:  # noqa: BLE001 -- any import failure is the finding
                self.problem(node, f"import {alias.name}: {type(exc).__name__}: {exc}")
                continue
            self.result.imports += 1
            if alias.asname:
                self.env[alias.asname] = mod
            else:
                self.env[alias.name.split(".")[0]] = importlib.import_module(
                    alias.name.split(".")[0]
                )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        for alias in node.names:
            try:
                obj = _resolve_import(node.module or "", alias.name)
            except Exception as exc:  # noqa: BLE001
                self.problem(
                    node, f"from {node.module} import {alias.name}: {type(exc).__name__}: {exc}"
                )
                continue
            self.result.imports += 1
            self.env[alias.asname or alias.name] = obj

    def visit_Assign(self, node: ast.Assign) -> None:  # noqa: N802
        self.generic_visit(node)
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
            value = self.resolve(node.value.func) if isinstance(node.value, ast.Call) else None
            if inspect.isclass(value):
                self.env[target] = _Instance(value)
                return
        for target in node.targets:  # reassigned to something untracked
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    self.env.pop(name.id, None)

    def resolve(self, node: ast.AST) -> Any:
        """The object an expression names, or None where it cannot be known statically."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Call):  # Booster(...).boost: an instance of the class called
            called = self.resolve(node.func)
            return _Instance(called) if inspect.isclass(called) else None
        if not isinstance(node, ast.Attribute):
            return None
        base = self.resolve(node.value)
        if base is None:
            return None
        owner = base.cls if isinstance(base, _Instance) else base
        if hasattr(owner, node.attr):
            return (
                _Method(owner, node.attr)
                if isinstance(base, _Instance)
                else getattr(owner, node.attr)
            )
        if inspect.ismodule(owner):
            try:
                return importlib.import_module(f"{owner.__name__}.{node.attr}")
            except ImportError:
                pass
        if inspect.ismodule(owner) or not isinstance(base, _Instance):
            self.problem(node, f"{_qualname(owner)} has no attribute {node.attr!r}")
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:  # noqa: N802
        if isinstance(node.ctx, ast.Load):
            self.resolve(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        for child in (*node.args, *(k.value for k in node.keywords)):
            self.visit(child)
        callee = self.resolve(node.func)
        if callee is None and isinstance(node.func, ast.Attribute):
            owner = self.resolve(node.func.value)
            if isinstance(owner, _Instance) and not hasattr(owner.cls, node.func.attr):
                self.problem(node, f"{_qualname(owner.cls)} has no attribute {node.func.attr!r}")
        if not isinstance(node.func, ast.Name | ast.Attribute):
            self.visit(node.func)
        if callee is None or any(isinstance(a, ast.Starred) for a in node.args):
            return
        if any(k.arg is None for k in node.keywords):
            return
        bound = callee.signature() if isinstance(callee, _Method) else _signature(callee)
        if bound is None:
            return
        sig, self_args = bound
        args = [None] * (self_args + len(node.args))
        try:
            sig.bind(*args, **{k.arg: None for k in node.keywords})
        except TypeError as exc:
            name = callee.label if isinstance(callee, _Method) else _qualname(callee)
            self.problem(node, f"{name}{sig}: {exc}")
            return
        self.result.calls += 1


@dataclass(frozen=True)
class _Method:
    """``instance.attr`` for a tracked instance: the attribute looked up on its class."""

    cls: type
    attr: str

    @property
    def label(self) -> str:
        return f"{_qualname(self.cls)}.{self.attr}"

    def signature(self) -> tuple[inspect.Signature, int] | None:
        static = inspect.getattr_static(self.cls, self.attr)
        found = _signature(getattr(self.cls, self.attr))
        if found is None:
            return None
        takes_self = not isinstance(static, staticmethod | classmethod)
        return found[0], int(takes_self and inspect.isfunction(getattr(self.cls, self.attr)))


def _signature(obj: Any) -> tuple[inspect.Signature, int] | None:
    if not callable(obj):
        return None
    try:
        return inspect.signature(obj), 0
    except (TypeError, ValueError):  # builtins and C extensions without a signature
        return None


def _qualname(obj: Any) -> str:
    if inspect.ismodule(obj):
        return obj.__name__
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def check_source(source: str, filename: str = "<snippet>", first: int = 1, last: int = 0) -> Result:
    """Check lines ``first..last`` of ``source`` (all of it when ``last`` is 0)."""
    tree = ast.parse(source, filename)
    last = last or len(source.splitlines())
    result = Result()
    for lineno, message in _pyflakes(source, filename):
        if first <= lineno <= last:
            result.problems.append(f"line {lineno}: {message}")
    checker = _Checker(Result())  # module-level imports are in scope for a tutorial's function
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno < first:
            checker.visit(node)
    checker.result = result
    for node in tree.body:
        if first <= node.lineno <= last:
            checker.visit(node)
    return result


def check_snippet(snippet: Snippet) -> Result:
    """Check one snippet of the site (see the module docstring for what is checked)."""
    return check_source(snippet.path.read_text(), str(snippet.path), snippet.first, snippet.last)


def check_names(text: str) -> tuple[int, list[str]]:
    """Resolve each ``colossalai.…`` name in double backquotes: (count, problems)."""
    names = sorted(set(NAME_RE.findall(text)))
    problems = []
    for dotted in names:
        parts = dotted.split(".")
        try:
            obj = importlib.import_module(parts[0])
            for i, part in enumerate(parts[1:], 1):
                if hasattr(obj, part):
                    obj = getattr(obj, part)
                else:
                    obj = importlib.import_module(".".join(parts[: i + 1]))
        except Exception as exc:  # noqa: BLE001
            if dotted not in REMOVED:
                problems.append(f"{dotted}: {type(exc).__name__}: {exc}")
        else:
            if dotted in REMOVED:
                problems.append(f"{dotted} is cited as removed, but it resolves")
    return len(names), problems


def _pages(root: Path) -> list[Path]:
    pages = sorted((root / "tutorials").glob("tutorial_*.py"))
    return pages + sorted(p for p in (root / "docs").rglob("*.md") if "_build" not in p.parts)


def check_site(root: Path = ROOT) -> tuple[dict[str, Result], dict[str, list[str]], int]:
    """Check every snippet and every page's named API: (snippet results, name problems, names)."""
    from cai_labs.colossal.components import COMPONENTS  # the APIs tutorial 08 tabulates

    results = {s.label: check_snippet(s) for s in find_snippets(root)}
    listed = " ".join(f"``{api}``" for c in COMPONENTS for api in c.apis)
    names, problems = check_names(listed)
    name_problems = {"components.py": problems} if problems else {}
    for page in _pages(root):
        count, problems = check_names(page.read_text())
        names += count
        if problems:
            name_problems[page.name] = problems
    return results, name_problems, names


def checked_here(function: Any) -> str:
    """A line for a page: ``function`` checked against the colossalai installed in this build.

    Where colossalai is not installed the line says so; where the check fails it raises, so a
    page never shows a snippet that no longer matches the release it names.
    """
    try:
        import colossalai
    except Exception as exc:  # noqa: BLE001 -- not installed, or against another torch
        return (
            f"`{function.__name__}` not checked in this build (colossalai: {type(exc).__name__}); "
            "`nox -s colossalai` checks it against 0.5.0"
        )
    path = Path(function.__code__.co_filename)
    if not path.is_file():
        return "not checked here (no source file); `nox -s colossalai` checks it"
    tree = ast.parse(path.read_text())
    node = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function.__name__
    )
    result = check_source(path.read_text(), str(path), node.lineno, node.end_lineno or 0)
    if not result.ok:
        raise AssertionError(f"{function.__name__} fails the check: {result.problems}")
    return (
        f"`{function.__name__}` checked against colossalai {colossalai.__version__} in this build: "
        f"{result.imports} imports resolve, {result.calls} calls bind to the installed signatures"
    )


def main() -> int:
    import colossalai

    results, name_problems, names = check_site()
    for label, res in results.items():
        status = "ok" if res.ok else "FAIL"
        print(f"{status:4} {label}: {res.imports} imports, {res.calls} calls bound")
        for p in res.problems:
            print(f"       {p}")
    for page, problems in name_problems.items():
        for p in problems:
            print(f"FAIL {page}: named API {p}")
    failed = sum(not r.ok for r in results.values()) + len(name_problems)
    print(
        f"checked {len(results)} Colossal-AI snippets "
        f"({sum(r.imports for r in results.values())} imports, "
        f"{sum(r.calls for r in results.values())} calls bound) and {names} named APIs "
        f"against colossalai {colossalai.__version__}: {failed} failed"
    )
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
