"""Point-to-point links between neighbouring pipeline stages.

Forward, stage ``s`` sends its output activation to stage ``s+1``; backward, stage ``s+1`` sends
the gradient of the loss with respect to that activation back to stage ``s``. That is all the
communication a pipeline needs: per micro-batch and per stage boundary, one activation of
``(b/m, s, d)`` forward and one gradient of the same shape back.

Sends are ``dist.isend`` (non-blocking): a stage never waits for its neighbour to be ready to
receive, so no ordering of sends can deadlock; the handles are awaited at the end of the step.
Receives are blocking ``dist.recv``: a stage cannot compute before its input has arrived.

The receiver must allocate a buffer of the right shape. The first time a micro-batch size is
used on a link, the sender first sends a small header (rank, shape, dtype code) and both sides
remember it; afterwards only the tensors travel.

Every message carries a ``tag`` (0 unless given). The interleaved schedule links the last rank
back to the first (a ring; on 2 ranks both neighbours are the same rank), so several streams
share a pair of ranks: :func:`~cai_labs.pipeline.schedules.pipeline_step` tags each stage boundary
and direction apart, and gloo matches a receive only with a send of its tag. NCCL ignores tags
and matches a pair of ranks' messages in order; the schedules' orders keep that order too
(checked on the orders; only gloo is run here).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cai_labs.launcher import device

__all__ = ["StageLinks"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_HEADER = 8  # int64 entries: ndim, dtype code, then up to 6 dims


class StageLinks:
    """This rank's neighbours in the pipeline: global ranks ``prev`` and ``next`` (or None).

    ``key`` identifies the tensor shape family of a step (the micro-batch size) for the shape
    handshake described in the module docstring.
    """

    def __init__(self, prev: int | None, next: int | None):  # noqa: A002 - pipeline vocabulary
        self.prev, self.next = prev, next
        self._sent_shapes: set = set()
        self._recv_shapes: dict = {}
        self._pending: list = []

    @classmethod
    def ring(cls, rank: int, n_ranks: int) -> StageLinks:
        """Links of pipeline rank ``rank`` of ``n_ranks`` with the last rank's next being rank 0
        (interleaved 1F1B: chunk ``c`` of the last rank feeds chunk ``c + 1`` of the first)."""
        if n_ranks < 2:
            raise ValueError(f"a ring of pipeline ranks needs at least 2 ranks; got {n_ranks}")
        return cls((rank - 1) % n_ranks, (rank + 1) % n_ranks)

    def send_forward(self, activation: torch.Tensor, key: object, tag: int = 0) -> None:
        """Send this stage's output (detached) to the next stage."""
        self._send(activation.detach(), self.next, key, tag)

    def recv_forward(self, key: object, tag: int = 0) -> torch.Tensor:
        """Receive the previous stage's output; it will need a gradient."""
        return self._recv(self.prev, key, tag).requires_grad_()

    def send_backward(self, grad: torch.Tensor, key: object, tag: int = 0) -> None:
        """Send the gradient w.r.t. this stage's input back to the previous stage."""
        self._send(grad, self.prev, key, tag)

    def recv_backward(self, key: object, tag: int = 0) -> torch.Tensor:
        """Receive the gradient w.r.t. this stage's output from the next stage."""
        return self._recv(self.next, key, tag)

    def wait(self) -> None:
        """Wait for every send of this step to complete."""
        for handle, _ in self._pending:
            handle.wait()
        self._pending.clear()

    # -- internals ------------------------------------------------------------------------
    def _send(self, t: torch.Tensor, peer: int | None, key: object, tag: int) -> None:
        if peer is None:
            raise RuntimeError("this stage has no neighbour in that direction")
        t = t.contiguous()
        if (peer, key, tag) not in self._sent_shapes:
            header = torch.zeros(_HEADER, dtype=torch.int64, device=t.device)
            header[0], header[1] = t.dim(), _DTYPES.index(t.dtype)
            header[2 : 2 + t.dim()] = torch.tensor(t.shape, device=t.device)
            self._pending.append((dist.isend(header, dst=peer, tag=tag), header))
            self._sent_shapes.add((peer, key, tag))
        self._pending.append((dist.isend(t, dst=peer, tag=tag), t))

    def _recv(self, peer: int | None, key: object, tag: int) -> torch.Tensor:
        if peer is None:
            raise RuntimeError("this stage has no neighbour in that direction")
        if (peer, key, tag) not in self._recv_shapes:
            header = torch.zeros(_HEADER, dtype=torch.int64, device=device())
            dist.recv(header, src=peer, tag=tag)
            ndim = int(header[0])
            self._recv_shapes[(peer, key, tag)] = (
                tuple(int(v) for v in header[2 : 2 + ndim]),
                _DTYPES[int(header[1])],
            )
        shape, dtype = self._recv_shapes[(peer, key, tag)]
        buf = torch.empty(shape, dtype=dtype, device=device())
        dist.recv(buf, src=peer, tag=tag)
        return buf
