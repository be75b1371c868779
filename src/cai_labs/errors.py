"""The errors a launch raises: a rank failed, or the whole call ran out of time.

In their own module so that the launcher and its torchrun path both raise the same classes.
"""

from __future__ import annotations

__all__ = ["RankFailed", "LaunchTimeout"]


class RankFailed(RuntimeError):
    """A rank raised (or died). ``rank`` says which; ``remote_traceback`` is its traceback."""

    def __init__(self, rank: int, remote_traceback: str) -> None:
        self.rank = rank
        self.remote_traceback = remote_traceback
        super().__init__(
            f"rank {rank} failed; all ranks were stopped. Its traceback:\n{remote_traceback}"
        )


class LaunchTimeout(TimeoutError):
    """The call did not finish within ``timeout`` seconds; all ranks were stopped."""
