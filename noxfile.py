"""Sessions: tests, docs (build + execute every tutorial), notebooks, torchrun, gpu, browser,
docs-noexec, lint, bench, colossalai, mutants.

torch is installed first and pinned, by ``TORCH_SPEC`` below, so that pip never resolves a
multi-GB CUDA build by itself. The default is the CPU build that the tutorials are verified on.
A GPU user picks their own build, for example::

    CAI_LABS_TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124" nox -s tests
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "docs"]
nox.options.reuse_existing_virtualenvs = True
# uv when it is installed (environments in seconds, not minutes), else the standard venv + pip.
nox.options.default_venv_backend = "uv|venv"
# uv reads its own settings, not pip's: carry over a local wheel folder pip is configured with
# (here, the CPU build of torch), so that both install the same files.
if "PIP_FIND_LINKS" in os.environ:
    os.environ.setdefault("UV_FIND_LINKS", os.environ["PIP_FIND_LINKS"])
# pip compiles every installed module to bytecode, uv does not by default: without the .pyc
# files (and with PYTHONDONTWRITEBYTECODE set, as on some CI images) every new process, each
# torchrun rank and notebook kernel, compiles torch and the rest from source again.
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")

PYTHON = "3.11"
TORCH_SPEC = shlex.split(os.environ.get("CAI_LABS_TORCH", "torch==2.13.0"))
# Keep pages and tests deterministic and quiet on small machines.
ENV = {
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",
}


def _install(session: nox.Session, extras: str, *pins: str) -> None:
    session.install(*TORCH_SPEC)
    session.install("-e", f".[{extras}]", *pins)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (parallel == serial, measured == formula, failures surface)."""
    _install(session, "test")
    session.run("pytest", *session.posargs, env=ENV)


def _sphinx(session: nox.Session, execute: bool) -> None:
    # A page must run in under 3 minutes: a launch still running after 400 s is a hang, and the
    # launcher then stops it and prints every rank's stack instead of stalling the build.
    env = dict(ENV, CAI_LABS_LAUNCH_TIMEOUT="400")
    if not execute:
        env["CAI_LABS_PLOT_GALLERY"] = "0"
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        *session.posargs,
        env=env,
    )


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the site, executing every tutorial; warnings are errors; then validate the pages.

    ``GALLERY_PATTERN=tutorial_00 nox -s docs`` executes only the matching tutorial(s).
    """
    _install(session, "docs,test")
    _install_colossalai(session)  # the pages' Colossal-AI cells run (CPU) or are checked (CUDA)
    _sphinx(session, execute=True)
    session.run("python", "docs/check_build.py", "docs/_build/html", env=ENV)


DOCS_ENV = Path(".nox") / "docs"


def _docs_env(session: nox.Session) -> tuple[str, dict[str, str]]:
    """The docs build's environment, for the sessions that execute every page (docs, notebooks,
    torchrun): they need the same packages, so they share one environment, installed once.
    ``nox -s docs --install-only`` brings it up to date (in seconds when it is)."""
    session.run(sys.executable, "-m", "nox", "-s", "docs", "--install-only", external=True)
    bindir = (DOCS_ENV / "bin").resolve()
    return str(bindir / "python"), dict(ENV, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")


@nox.session(venv_backend="none")
def notebooks(session: nox.Session) -> None:
    """Execute every notebook download of the built site in a Jupyter kernel (after docs), in
    the docs build's environment."""
    python, env = _docs_env(session)
    session.run(python, "docs/run_notebooks.py", *session.posargs, env=env, external=True)


@nox.session(venv_backend="none")
def torchrun(session: nox.Session) -> None:
    """Run every tutorial that launches ranks under torchrun (gloo, CPU) with as many processes
    as its largest launch; then one page as two torchrun agents joined on loopback (a two-node
    cluster). In the docs build's environment."""
    python, env = _docs_env(session)
    pattern = session.posargs or ["tutorial_"]
    session.run(python, "docs/run_torchrun.py", *pattern, env=env, external=True)
    if not session.posargs:
        two_nodes = ["tutorial_10", "--nnodes=2", "--nproc-per-node=2"]
        session.run(python, "docs/run_torchrun.py", *two_nodes, env=env, external=True)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """On a machine with CUDA, in the current environment (its own torch build): the
    parallel-vs-serial tests and every page, results under docs/gpu_results/. Skips without
    CUDA."""
    session.run("python", "docs/run_gpu.py", env=ENV)


@nox.session(python=PYTHON)
def browser(session: nox.Session) -> None:
    """Load every page of the built site in headless Chromium (run ``nox -s docs`` first).

    Needs Debian's ``chromium`` (``apt-get install chromium``); Playwright drives it, no browser
    download. Screenshots go to ``artifacts/screenshots``.
    """
    session.install("pytest>=8", "pytest-timeout>=2.3", "playwright>=1.45")
    session.run(
        "pytest",
        "-m",
        "browser",
        "tests/browser",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env=ENV,
    )


@nox.session(name="docs-noexec", python=PYTHON)
def docs_noexec(session: nox.Session) -> None:
    """Build the site without executing tutorials (fast, for prose edits)."""
    _install(session, "docs")
    _sphinx(session, execute=False)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run every ``benchmarks/bench_*.py``: each prints measured ratios against PyTorch."""
    _install(session, "bench")
    for script in sorted(Path("benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the package, tests, tutorials and docs code."""
    session.install("ruff>=0.6")
    paths = ["src", "tests", "tutorials", "benchmarks", "noxfile.py", "docs"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


# What Colossal-AI 0.5.0's CPU code paths import, installed next to it without its pins (it pins
# torch<=2.5.1); pyflakes is for the snippet check.
COLOSSALAI_DEPS = [
    "packaging",
    "psutil",
    "tqdm",
    "rich",
    "click",
    "contexttimer",
    "einops",
    "pydantic",
    "safetensors",
    "sentencepiece",
    "ninja",
    "fabric",
    "protobuf",
    "galore-torch",
    "peft",
    "diffusers",
    "pyflakes",
]


# The release's own transformers pin, which its ShardFormer policies need, resolved together with
# the project (so that a reused environment is not upgraded and downgraded on every run). The
# release pins diffusers 0.29.0; the project needs >=0.31, and 0.33.1 still imports with the
# huggingface-hub 0.x that transformers 4.51.3 needs (colossalai.inference imports diffusers).
COLOSSALAI_PINS = ("transformers==4.51.3", "diffusers==0.33.1")


def _install_colossalai(session: nox.Session) -> None:
    session.install("--no-deps", "colossalai==0.5.0")
    session.install(*COLOSSALAI_DEPS)


@nox.session(python=PYTHON)
def colossalai(session: nox.Session) -> None:
    """Check every Colossal-AI snippet of the site against 0.5.0; cross-check what runs on CPU.

    Colossal-AI 0.5.0 pins torch<=2.5.1 and transformers==4.51.3; we install it without its
    dependencies and add the ones its CPU code paths import, keeping this project's torch.
    Transformers is the release's own 4.51.3 here: its ShardFormer policies import modules
    that transformers 5 removed.
    """
    _install(session, "test", *COLOSSALAI_PINS)
    _install_colossalai(session)
    session.run("python", "-m", "cai_labs.colossal.check", env=ENV)
    session.run("python", "-m", "cai_labs.colossal.probes", env=ENV)
    session.run("pytest", "-m", "colossalai", "-p", "no:cacheprovider", *session.posargs, env=ENV)


MUTATION_SCORE = 0.85  # share of mutants of the formula and accounting code the tests must kill


@nox.session(python=PYTHON)
def mutants(session: nox.Session) -> None:
    """Mutation testing (mutmut) of the formula and accounting modules against their fast tests.

    What is mutated and which tests run are in ``[tool.mutmut]`` of ``pyproject.toml``. Prints
    the score (killed / mutants that some test reaches) and every surviving mutant; fails below
    ``MUTATION_SCORE``. Not part of ``.ci/run``, it is slow: on 2 quiet cores the accounting
    modules alone (1,300 mutants, with a 30 s limit per test) took 22 minutes; with every
    ``formulas.py`` and the scale model (4,014 mutants) a run on 2 shared cores had checked 3,658
    after 75 minutes.
    ``nox -s mutants -- show NAME`` prints one mutant's diff.
    """
    import json
    import shutil

    _install(session, "test")
    session.install("mutmut==3.8.1")
    if session.posargs[:1] == ["show"]:
        session.run("mutmut", "show", *session.posargs[1:], env=ENV)
        return
    shutil.rmtree("mutants", ignore_errors=True)  # a clean run: no stale results
    session.run("mutmut", "run", "--max-children", str(os.cpu_count() or 2), env=ENV)
    session.run("mutmut", "export-cicd-stats", env=ENV)
    stats = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
    session.run("mutmut", "results", env=ENV)  # every mutant not killed, by name
    killed = stats["killed"] + stats.get("timeout", 0)
    reached = stats["total"] - stats.get("no_tests", 0) - stats.get("skipped", 0)
    score = killed / max(reached, 1)
    session.log(f"mutation score: {killed}/{reached} = {score:.1%} killed ({stats})")
    if score < MUTATION_SCORE:
        session.error(f"mutation score {score:.1%} is below {MUTATION_SCORE:.0%}")
