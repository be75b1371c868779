"""Colossal-AI 0.5.0 next to cai_labs: the snippet check, the CPU probes and their shims.

Nothing here is needed to run the tutorials: these modules check the Colossal-AI code that the
pages show (:mod:`~cai_labs.colossal.check`) and run the parts of Colossal-AI that work on CPU
ranks against the matching cai_labs technique (:mod:`~cai_labs.colossal.probes`).

Importing Colossal-AI on a CPU machine warns that its CUDA kernels' packages (apex, tensornvme,
pulp) are missing, and its plugins log the same through its logger; on CPU ranks those notices
say nothing about the code checked here, so this package silences them (errors still show).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

__all__ = ["checked_here"]

warnings.filterwarnings("ignore", category=UserWarning, module=r"colossalai(\.|$)")
# A filter, not a level: Colossal-AI sets its logger's level to INFO when it first uses it.
logging.getLogger("colossalai").addFilter(lambda record: record.levelno >= logging.ERROR)


def checked_here(function: Any) -> str:
    """:func:`cai_labs.colossal.check.checked_here`, imported on first use (so that
    ``python -m cai_labs.colossal.check`` does not find its module already imported)."""
    from cai_labs.colossal.check import checked_here as check

    return check(function)
