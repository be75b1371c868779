"""The serial GPT :class:`~cai_labs.models.gpt.Block`, assembled from any mode's layers.

Every tensor-parallel mode (1D, 2D, 2.5D, 3D) keeps the Block's shape: ``x + attn(ln1(x))``,
then ``+ mlp(ln2(x))``; attention is ``qkv -> softmax attention on whole local heads -> proj``;
the MLP is ``fc1 -> GELU -> fc2``. What a mode changes is only *which* linear and layer norm it
plugs in (column/row-parallel, SUMMA, 3D cube) and so the layout of the activations between
them. This module writes the shape once; each ``layers_*`` module builds its Block from it.

Every part keeps the serial names (``attn.qkv.weight``, ``mlp.fc2.bias``, ...), and
``serial_state`` gathers parameters (or gradients) back to full shape under those names, which is
how the tests compare a parallel Block with its serial twin.
"""

from __future__ import annotations

import torch
from torch import nn

from cai_labs.models.gpt import causal_attention

__all__ = ["ParallelAttention", "ParallelMLP", "ParallelBlock", "serial_state_of"]


def serial_state_of(children: dict[str, nn.Module], grads: bool = False) -> dict[str, torch.Tensor]:
    """Full-shape parameters (or gradients) of ``children`` under ``"<name>.<param>"`` keys.

    A child with ``serial_state`` gathers its own shards; any other child (a replicated
    ``nn.LayerNorm``) is whole on every rank and is copied as it is.
    """
    out = {}
    for prefix, mod in children.items():
        if hasattr(mod, "serial_state"):
            state = mod.serial_state(grads)
        else:
            params = mod.named_parameters()
            state = {n: (p.grad if grads else p).detach().clone() for n, p in params}
        out.update({f"{prefix}.{k}": v for k, v in state.items()})
    return out


class ParallelAttention(nn.Module):
    """``proj(attention(qkv(x)))`` on this rank's ``n_heads`` whole heads.

    ``qkv`` must output ``[q | k | v]`` of this rank's heads on its last dim (``(.., s, 3*dl)``,
    which the modes' ``from_serial(..., chunks=3)`` arrange); heads are independent, so the
    attention itself needs no communication in any mode.
    """

    def __init__(self, qkv: nn.Module, proj: nn.Module, n_heads: int, causal: torch.Tensor) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = qkv
        self.proj = proj
        self.register_buffer("causal", causal.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(causal_attention(self.qkv(x), self.n_heads, self.causal))

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        return serial_state_of({"qkv": self.qkv, "proj": self.proj}, grads)


class ParallelMLP(nn.Module):
    """``fc2(GELU(fc1(x)))``; GELU is elementwise, so it runs on whatever block a rank holds."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1 = fc1
        self.act = nn.GELU()
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        return serial_state_of({"fc1": self.fc1, "fc2": self.fc2}, grads)


class ParallelBlock(nn.Module):
    """Pre-norm residual block; the residual adds are local in every mode (the two operands
    always have the same layout)."""

    def __init__(self, ln1: nn.Module, attn: nn.Module, ln2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1 = ln1
        self.attn = attn
        self.ln2 = ln2
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def serial_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or gradient) at full shape under the serial Block's names."""
        return serial_state_of(
            {"ln1": self.ln1, "attn": self.attn, "ln2": self.ln2, "mlp": self.mlp}, grads
        )
