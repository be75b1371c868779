"""1D (Megatron) tensor parallelism for Hugging Face's ``OPTForCausalLM``: attention and MLP split.

:func:`parallelize_opt` replaces, in place, in every ``OPTDecoderLayer``: ``q/k/v_proj`` and
``fc1`` by column-parallel linears, ``out_proj`` and ``fc2`` by row-parallel ones, and the
attention by :class:`ParallelOPTAttention` (``num_heads/N`` whole heads, same state-dict keys,
key/value cache supported). Embeddings, layer norms and the tied ``lm_head`` stay replicated.
Four all-reduces of ``(b, s, d)`` per layer and step
(:func:`~cai_labs.tensor_parallel.formulas.opt_1d_cost`); dropout must be 0 to equal serial.
Why the split is exact is told in tutorial 05.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cai_labs.comm import copy_to_group
from cai_labs.tensor_parallel.grid import Grid
from cai_labs.tensor_parallel.layers_1d import ColumnParallelLinear, RowParallelLinear

if TYPE_CHECKING:
    from transformers import Cache, OPTConfig

__all__ = [
    "check_opt_tp_size",
    "ParallelOPTAttention",
    "parallelize_opt",
    "opt_full_state",
    "is_sharded",
]


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _join(xs: list[int]) -> str:
    words = [str(x) for x in xs]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def check_opt_tp_size(config: OPTConfig, size: int) -> None:
    """Raise a ValueError saying which sizes work unless ``size`` ranks can split this OPT.

    Heads are split whole (``num_attention_heads % size == 0``) and so are the MLP's columns
    (``ffn_dim % size == 0``). Needs no process group: call it before launching ranks.
    """
    heads, ffn = config.num_attention_heads, config.ffn_dim
    ok = [k for k in _divisors(heads) if ffn % k == 0]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer; got {size!r}")
    if heads % size:
        raise ValueError(
            f"OPT has {heads} attention heads; tensor-parallel size {size} does not divide "
            f"them: use {_join(ok)}"
        )
    if ffn % size:
        raise ValueError(
            f"OPT has ffn_dim={ffn}; tensor-parallel size {size} does not divide it: "
            f"use {_join(ok)}"
        )


class ParallelOPTAttention(nn.Module):
    """OPT self-attention on ``num_heads/N`` heads of this rank (drop-in for ``OPTAttention``).

    Shapes on each rank: ``hidden_states (b, s, d)`` whole -> ``q_proj``/``k_proj``/``v_proj``
    column-parallel, each ``(b, s, d/N)`` -> ``(b, h/N, s, d/h)`` -> attention ->
    ``(b, s, d/N)`` -> ``out_proj`` row-parallel (all-reduce) -> ``(b, s, d)`` whole.

    As in ``OPTAttention``, ``q`` is scaled by ``1/sqrt(d/h)`` after its projection (bias
    included) and attention is then called with scale 1.
    """

    def __init__(self, attn: nn.Module, grid: Grid) -> None:
        super().__init__()
        self.grid = grid
        self.num_heads = attn.num_heads // grid.size  # local heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.dropout = attn.dropout
        self.layer_idx = attn.layer_idx
        self.is_causal = True
        col = dict(reduce_input_grad=False)  # one all-reduce of dX for q, k and v together
        self.k_proj = ColumnParallelLinear.from_serial(attn.k_proj, grid, **col)
        self.v_proj = ColumnParallelLinear.from_serial(attn.v_proj, grid, **col)
        self.q_proj = ColumnParallelLinear.from_serial(attn.q_proj, grid, **col)
        self.out_proj = RowParallelLinear.from_serial(attn.out_proj, grid)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """``(b, s, d)`` -> ``((b, s, d), None)``, as ``OPTAttention`` returns (no weights)."""
        cache = (
            cache
            if cache is not None
            else kwargs.get("past_key_values", kwargs.get("past_key_value"))
        )
        b, s, _ = hidden_states.shape
        x = copy_to_group(hidden_states, self.grid.group)  # backward: all-reduce dX once

        def heads(t: torch.Tensor) -> torch.Tensor:  # (b, s, d/N) -> (b, h/N, s, d/h)
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x) * self.scaling)
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        causal = attention_mask is None and s > 1
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            is_causal=causal,
            scale=1.0,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (b, h/N, s, d/h)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.out_proj(out), None


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    layers = [m for m in model.modules() if isinstance(m, OPTDecoderLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no OPTDecoderLayer: pass an OPT model")
    return layers


def parallelize_opt(model: nn.Module, grid: Grid) -> nn.Module:
    """Split ``model``'s attention and MLP over ``grid`` (1D) in place; returns ``model``.

    ``model`` must hold the same weights on every rank of the grid (load the same checkpoint,
    or seed the initialisation): each rank keeps its slice of every split layer. Every rank of
    the grid must then run forward and backward on the *same* batch. Embeddings, layer norms and
    ``lm_head`` stay replicated. Raises ValueError if the heads or ``ffn_dim`` do not split.
    """
    if grid.mode != "1d":
        raise ValueError(f"parallelize_opt splits over a 1D grid; got a {grid.mode} grid")
    check_opt_tp_size(model.config, grid.size)
    for layer in _decoder_layers(model):
        layer.self_attn = ParallelOPTAttention(layer.self_attn, grid)
        layer.fc1 = ColumnParallelLinear.from_serial(layer.fc1, grid)
        layer.fc2 = RowParallelLinear.from_serial(layer.fc2, grid)
    return model


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds a slice (column- or row-parallel) rather than a full copy."""
    return isinstance(module, ColumnParallelLinear | RowParallelLinear)


def opt_full_state(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) at full shape, under the serial model's names.

    Split layers are all-gathered (a collective: every rank of the grid must call it);
    replicated ones are copied. Tied weights appear once, as in ``named_parameters()``.
    """
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, mod in model.named_modules():
        if is_sharded(mod):
            for k, t in mod.serial_state(grads).items():
                out[f"{name}.{k}"] = t
                done.add(f"{name}.{k}")
    for name, p in model.named_parameters():
        if name not in done:
            t = p.grad if grads else p
            out[name] = None if t is None else t.detach().clone()
    return out
