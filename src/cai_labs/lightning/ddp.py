"""Lightning's DDP on ranks that already exist: no launcher, so it also runs from a notebook.

``DDPStrategy`` always configures a launcher that re-runs the script, and a Trainer built in an
interactive session (Jupyter sets ``sys.ps1``) refuses a launcher that is not notebook-safe. On
ranks started by :func:`cai_labs.launch` nothing is left to launch: the strategy has no launcher,
and the Trainer runs in the calling rank, from a script, a notebook or torchrun alike. Gradient
synchronisation is Lightning's own DDP, unchanged.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

__all__ = ["ExistingRanksDDPStrategy"]


class ExistingRanksDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose cluster environment created the processes: nothing to launch."""

    def _configure_launcher(self) -> None:
        if self.cluster_environment is not None and (
            self.cluster_environment.creates_processes_externally
        ):
            self._launcher = None
        else:
            super()._configure_launcher()
