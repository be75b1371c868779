"""Cross-entropy on logits split by vocabulary, without ever gathering them (Megatron-LM).

Why: a 1D tensor-parallel head ``d -> V`` is column-parallel, so rank ``r`` ends with the logits
of its vocabulary slice ``[r*V/N, (r+1)*V/N)``: ``(b, s, V/N)``. Gathering them before
``F.cross_entropy`` puts the whole ``(b, s, V)`` on every rank (plus the ``(b, s, V)``
log-softmax saved for backward), and with ``V`` = 50k-250k words the logits are often the
largest activation of the model. The gather also sends ``b*s*V`` elements per rank.

But the loss of one token only needs three numbers per row, each a reduction over the
vocabulary that splits into a reduction of per-rank reductions:

1. ``m = max_j z_j`` for a stable softmax: local row maxima, then an all-reduce **MAX**;
2. ``S = sum_j exp(z_j - m)``: local sums, then an all-reduce **SUM**;
3. ``z_t - m``, the target's shifted logit: only the rank whose slice holds ``t`` knows it; the
   others contribute 0 and an all-reduce **SUM** gives it to everyone.

Then ``loss = log S - (z_t - m)`` on every rank. Three all-reduces of ``b*s`` elements instead of
an all-gather of ``b*s*V``: the ratio is ``3/V``.

Backward needs no communication: ``d loss / d z_j = softmax_j - [j == t]``, and each rank
holds its own ``softmax_j = exp(z_j - m) / S`` (the global ``m`` and ``S`` are already known) and
subtracts 1 only where the target falls in its slice. So each rank saves its
``(b, s, V/N)`` softmax, ``1/N`` of what gather-then-CE saves.

Shapes: ``local_logits (..., V/N)`` (any leading dims, e.g. ``(b, s, V/N)``), ``targets (...)``
of global vocabulary ids (the same on every rank), result ``(...)`` per token with
``reduction="none"``. The vocabulary split is the one of
:class:`~cai_labs.tensor_parallel.layers_1d.VocabParallelEmbedding` and of a
:class:`~cai_labs.tensor_parallel.layers_1d.ColumnParallelLinear` head: equal contiguous slices
in group-rank order, so ``V`` must be divisible by ``N``.

All collectives are ``dist.all_reduce(..., group=group)`` so :class:`cai_labs.Ledger` counts them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx
from torch.distributed import ProcessGroup

from cai_labs.comm import all_reduce_, rank
from cai_labs.tensor_parallel.grid import check_divisible

__all__ = ["vocab_parallel_cross_entropy", "vocab_range"]


def vocab_range(vocab_per_rank: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of the global vocabulary ids that rank ``rank`` of the group holds."""
    return rank * vocab_per_rank, (rank + 1) * vocab_per_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss ``(...)`` from local logits ``(..., V/N)``; see the module docstring."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        local_logits: torch.Tensor,
        targets: torch.Tensor,
        group: ProcessGroup,
        ignore_index: int,
    ) -> torch.Tensor:
        v_local = local_logits.shape[-1]
        start, end = vocab_range(v_local, rank(group))
        z = local_logits.detach()

        # 1. the global row maximum (all-reduce MAX of b*s elements)
        row_max = z.amax(dim=-1)
        all_reduce_(row_max, group, dist.ReduceOp.MAX)
        shifted = z - row_max.unsqueeze(-1)  # (..., V/N), <= 0

        # 2. the target's shifted logit, from the rank that holds it (all-reduce SUM)
        valid = targets != ignore_index
        mine = valid & (targets >= start) & (targets < end)
        local_t = torch.where(mine, targets - start, torch.zeros_like(targets))
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(mine, target_logit, torch.zeros_like(target_logit))
        all_reduce_(target_logit, group)

        # 3. the softmax denominator (all-reduce SUM)
        exp = shifted.exp_()  # reuse the buffer: it becomes the softmax numerator
        sum_exp = exp.sum(dim=-1)
        all_reduce_(sum_exp, group)

        loss = torch.where(valid, sum_exp.log() - target_logit, torch.zeros_like(sum_exp))
        # Saved for backward: this rank's softmax, with the rows of ignored tokens zeroed (their
        # gradient is 0), and the local target column, -1 where the target is elsewhere.
        softmax = exp.div_(sum_exp.unsqueeze(-1)).mul_(valid.unsqueeze(-1))
        local_target = torch.where(mine, local_t, torch.full_like(local_t, -1))
        ctx.save_for_backward(softmax, local_target)
        return loss

    @staticmethod
    def backward(ctx: FunctionCtx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_target = ctx.saved_tensors
        grad = softmax.clone()  # d loss / d z = softmax - onehot(target), per token
        rows = local_target >= 0
        grad[rows, local_target[rows]] -= 1.0
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    group: ProcessGroup,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits split by vocabulary over ``group``, equal to
    ``F.cross_entropy(all_gather(local_logits), targets)`` without gathering them.

    Args:
        local_logits: ``(..., V/N)``, this rank's slice ``[r*V/N, (r+1)*V/N)`` of the logits
            (``r`` = rank in ``group``), e.g. a column-parallel head's output ``(b, s, V/N)``.
        targets: ``(...)`` global ids in ``[0, V)``, or ``ignore_index``; the same on every rank.
        group: the tensor-parallel group that splits the vocabulary.
        ignore_index: targets with this id add no loss and no gradient (as in PyTorch).
        reduction: ``"none"`` (per-token ``(...)``), ``"sum"``, or ``"mean"`` over the
            non-ignored tokens (PyTorch's default).
        vocab_size: the whole ``V``, if known: checked to be ``N * local_logits.shape[-1]``
            (raises a ValueError naming ``V`` and ``N`` when ``V`` does not split evenly).

    Communication (forward only): 3 all-reduces of ``targets.numel()`` elements (none for a
    group of one). Saved for backward: this rank's softmax ``(..., V/N)`` and the local target
    column (int64, ``(...)``).
    """
    n = dist.get_world_size(group)
    v_local = local_logits.shape[-1]
    if vocab_size is not None:
        check_divisible("the vocabulary", vocab_size, n, "1D")
        if vocab_size != n * v_local:
            raise ValueError(
                f"local logits have {v_local} columns, but vocab_size={vocab_size} over {n} "
                f"ranks needs {vocab_size // n}; pass this rank's slice of the logits"
            )
    if local_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match the logits' leading shape "
            f"{tuple(local_logits.shape[:-1])} (logits are (..., V/N), targets (...))"
        )
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 vocabulary ids; got {targets.dtype}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean'; got {reduction!r}")
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= n * v_local))
    if bad.any():
        raise ValueError(
            f"target id {targets[bad][0].item()} is outside the vocabulary [0, {n * v_local}) "
            f"of {n} ranks x {v_local} columns (and is not ignore_index={ignore_index})"
        )
    loss = _VocabParallelCrossEntropy.apply(local_logits, targets, group, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()
