"""Colossal-AI 0.5.0 next to cai_labs: the snippet check, the CPU probes and their shims.

Nothing here is needed to run the tutorials: these modules check the Colossal-AI code that the
pages show (:mod:`~cai_labs.colossal.check`) and run the parts of Colossal-AI that work on CPU
ranks against the matching cai_labs technique (:mod:`~cai_labs.colossal.probes`).
"""

__all__ = ["checked_here"]


def checked_here(function) -> str:
    """:func:`cai_labs.colossal.check.checked_here`, imported on first use (so that
    ``python -m cai_labs.colossal.check`` does not find its module already imported)."""
    from cai_labs.colossal.check import checked_here as check

    return check(function)
