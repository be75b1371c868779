"""Where a page's numbers came from: library versions, CPU, cores, ranks per core, date.

Every measured time on a page is a property of the technique *and* of the machine that ran it.
Pages print :func:`describe` near the top, so a reader can tell the two apart.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

__all__ = ["environment", "describe", "cpu_flags"]

_LIBRARIES = ("torch", "numpy", "transformers", "diffusers", "lightning", "colossalai")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(*wanted: str) -> list[str]:
    """Which of ``wanted`` (``/proc/cpuinfo`` flags, e.g. ``"avx512_bf16"``) this CPU has."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [w for w in wanted if w in flags]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def environment(libraries: tuple[str, ...] = _LIBRARIES) -> dict[str, object]:
    """The build's environment as plain data (installed libraries only)."""
    versions = {}
    for name in libraries:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "libraries": versions,
        "cpu": _cpu_model(),
        "cores": _cores(),
        "os": f"{platform.system()} {platform.release().split('-')[0]}",
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }


def describe(ranks: int | None = None, libraries: tuple[str, ...] = _LIBRARIES) -> str:
    """One line for a page: versions, CPU model, cores, ranks per core (for ``ranks``), date."""
    env = environment(libraries)
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    per_core = f", {ranks} ranks = {ranks / env['cores']:g} per core" if ranks else ""
    return (
        f"built {env['date']} with Python {env['python']}, {libs}; {env['cpu']}, "
        f"{env['cores']} cores{per_core}; {env['os']}"
    )
