"""Which parts of Colossal-AI 0.5.0 run on CPU ranks (gloo), each checked against its twin.

Each probe is a worker for :func:`cai_labs.launch`: it runs one Colossal-AI feature on every
rank and returns the largest difference from the matching cai_labs technique or serial model
(float64 where the feature allows it), or raises the error that stops it on CPU.
:func:`probe_all` runs them all and returns the rows of the table that the site shows.

The one shim, :func:`cpu_rng_shim`: Colossal-AI's CPU accelerator passes a device to
``torch.get_rng_state()``, which takes none, and refuses ``manual_seed``; ShardFormer's
column-parallel layers call both when they fork the RNG for dropout. The shim gives the
accelerator the CPU generator's own two calls.
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["cpu_rng_shim", "PROBES", "Probe", "probe_all"]

PRELOAD = ("colossalai.booster.plugin", "colossalai.shardformer", "colossalai.lazy", "transformers")
SHIM = "CpuAccelerator.get_rng_state/manual_seed -> torch.get_rng_state/manual_seed"


def cpu_rng_shim() -> None:
    """Make Colossal-AI's CPU accelerator forward its RNG calls to the CPU generator."""
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    CpuAccelerator.get_rng_state = lambda self, device=None: torch.get_rng_state()
    CpuAccelerator.manual_seed = lambda self, seed: torch.manual_seed(seed)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g)


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def _plugin_step(make_plugin: Callable[[], object]) -> float:
    """One SGD step through a Booster plugin vs cai_labs data parallel: max |param diff|."""
    from colossalai.booster import Booster

    from cai_labs.data_parallel import allreduce_gradients, shard_batch

    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = shard_batch(*_batch(), rank=rank, world_size=world)
    ours, theirs = _mlp(), _mlp()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    nn.functional.mse_loss(ours(x), y.double()).backward()
    allreduce_gradients(ours)
    opt.step()
    booster = Booster(plugin=make_plugin())
    model, optim, *_ = booster.boost(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1))
    booster.backward(nn.functional.mse_loss(model(x), y.double()), optim)
    optim.step()
    return _gap(list(ours.parameters()), list(model.unwrap().parameters()))


def torch_ddp() -> float:
    from colossalai.booster.plugin import TorchDDPPlugin

    return _plugin_step(TorchDDPPlugin)


def torch_fsdp() -> float:
    from colossalai.booster.plugin import TorchFSDPPlugin

    return _plugin_step(TorchFSDPPlugin)


def low_level_zero() -> float:
    from colossalai.booster.plugin import LowLevelZeroPlugin

    return _plugin_step(lambda: LowLevelZeroPlugin(stage=2, precision="fp32"))


def gemini() -> float:
    from colossalai.booster.plugin import GeminiPlugin

    return _plugin_step(GeminiPlugin)


def _tiny_opt() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """Two copies of one tiny OPT (float64, eager attention, vocabulary 128) and a batch."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    config._attn_implementation = "eager"  # 0.5.0's OPT policy has no "sdpa" entry
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(OPTForCausalLM(config).double().train())
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    return models[0], models[1], ids


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in the logits' dtype (HF upcasts to float32; we keep float64)."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def _rank_slice(full: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous block of ``full`` along the one dimension where shapes differ."""
    for dim, (a, b) in enumerate(zip(full.shape, shard.shape, strict=True)):
        if a != b:
            return full.narrow(dim, dist.get_rank() * b, b)
    return full


def shardformer_opt() -> float:
    """ShardFormer's OPT policy, 1D tensor parallel over all ranks, vs the serial model in
    float64: max abs difference of the loss and of every gradient (each rank's slice).

    cai_labs' :func:`~cai_labs.tensor_parallel.opt_1d.parallelize_opt` is the same split; it is
    checked against the same serial model by ``tests/test_opt_tensor_parallel.py`` under the
    transformers of the other sessions (its attention returns the 2 values transformers 5
    expects, where 4.51.3, which ShardFormer needs, expects 3)."""
    from colossalai.shardformer import ShardConfig, ShardFormer

    serial, theirs, ids = _tiny_opt()
    config = ShardConfig(  # no vocabulary padding: every rank's rows are real rows
        tensor_parallel_process_group=dist.group.WORLD,
        parallel_output=False,
        make_vocab_size_divisible_by=1,
    )
    theirs, _ = ShardFormer(config).optimize(theirs)
    losses = [_lm_loss(m(input_ids=ids).logits, ids) for m in (serial, theirs)]
    for loss in losses:
        loss.backward()
    gaps = [abs(losses[0].item() - losses[1].item())]
    full = dict(serial.named_parameters())
    for name, p in theirs.named_parameters():
        gaps.append((_rank_slice(full[name].grad, p.grad) - p.grad).abs().max().item())
    worst = torch.tensor(max(gaps), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank's slices, not only rank 0's
    return worst.item()


def hybrid_parallel() -> float:
    """``HybridParallelPlugin(tp_size=world)`` on the tiny OPT: its loss vs the serial model's."""
    from colossalai.booster import Booster
    from colossalai.booster.plugin import HybridParallelPlugin

    serial, theirs, ids = _tiny_opt()
    tp = dist.get_world_size()
    plugin = HybridParallelPlugin(tp, 1, precision="fp32", parallel_output=False)
    booster = Booster(plugin=plugin)
    model, *_ = booster.boost(theirs, torch.optim.SGD(theirs.parameters(), lr=0.1))
    loss = _lm_loss(model(input_ids=ids).logits, ids)
    return abs(loss.item() - _lm_loss(serial(input_ids=ids).logits, ids).item())


def lazy_init() -> float:
    """``LazyInitContext``: build without memory, materialise; same weights as eager init."""
    from colossalai.lazy import LazyInitContext

    with LazyInitContext():
        lazy = _mlp()
    LazyInitContext.materialize(lazy)
    return _gap(list(_mlp().parameters()), list(lazy.parameters()))


def checkpoint_io() -> float:
    """``GeneralCheckpointIO``: a sharded save and a load restore every tensor exactly."""
    from colossalai.checkpoint_io import GeneralCheckpointIO

    io, saved, loaded = GeneralCheckpointIO(), _mlp(0), _mlp(1)
    with tempfile.TemporaryDirectory() as path:
        io.save_model(saved, path, shard=True, size_per_shard=1)  # MB: one shard here
        io.load_model(loaded, path)
    return _gap(list(saved.parameters()), list(loaded.parameters()))


def hybrid_adam() -> float:
    """``HybridAdam`` on CPU parameters (its CPU Adam kernel) vs ``torch.optim.Adam``."""
    from colossalai.nn.optimizer import HybridAdam

    ours, theirs = _mlp(), _mlp()
    ours.float(), theirs.float()
    x, y = _batch()
    pairs = [(ours, torch.optim.Adam(ours.parameters(), lr=1e-2))]
    pairs.append((theirs, HybridAdam(theirs.parameters(), lr=1e-2, adamw_mode=False)))
    for model, opt in pairs:
        nn.functional.mse_loss(model(x.float()), y).backward()
        opt.step()
    return _gap(list(ours.parameters()), list(theirs.parameters()))


@dataclass(frozen=True)
class Probe:
    """One row of the table: a feature, its worker, what it is compared with, the shim it needs."""

    feature: str
    worker: Callable[[], float]
    twin: str
    shim: str = ""


PROBES = [
    Probe("Booster + TorchDDPPlugin", torch_ddp, "cai_labs.data_parallel (1 SGD step)"),
    Probe("Booster + TorchFSDPPlugin", torch_fsdp, "cai_labs.data_parallel (1 SGD step)"),
    Probe("Booster + LowLevelZeroPlugin", low_level_zero, "cai_labs.data_parallel"),
    Probe("Booster + GeminiPlugin", gemini, "cai_labs.data_parallel"),
    Probe("Booster + HybridParallelPlugin (TP)", hybrid_parallel, "serial OPT (loss)", SHIM),
    Probe(
        "ShardFormer: OPT, 1D tensor parallel",
        shardformer_opt,
        "serial OPT (loss, every gradient, float64)",
        SHIM,
    ),
    Probe("LazyInitContext", lazy_init, "eager initialisation, same seed"),
    Probe("GeneralCheckpointIO (sharded)", checkpoint_io, "the saved model"),
    Probe("HybridAdam", hybrid_adam, "torch.optim.Adam (1 step, float32)"),
]


def _shimmed(worker: Callable[[], float]) -> float:
    cpu_rng_shim()
    return worker()


def _run(probe: Probe, world_size: int) -> dict:
    from cai_labs import launch

    row = {"feature": probe.feature, "compared with": probe.twin, "shim": probe.shim or "-"}
    try:
        if probe.shim:
            gap = launch(_shimmed, world_size, probe.worker, timeout=240)
        else:
            gap = launch(probe.worker, world_size, timeout=240)
    except Exception as exc:  # noqa: BLE001 -- the error that stops it is the finding
        text = str(exc).strip().splitlines()
        row.update({"runs on CPU": "no", "max abs difference": "", "error": _last_error(text)})
        return row
    row.update({"runs on CPU": "yes", "max abs difference": f"{gap:.1e}", "error": ""})
    return row


def _last_error(lines: list[str]) -> str:
    """The failing rank's last error line, and the function that raised it."""
    errors = [ln.strip() for ln in lines if "Error" in ln or "Exception" in ln]
    frames = [ln.rsplit(" in ", 1)[-1] for ln in lines if ln.strip().startswith("File ")]
    where = f" (in {frames[-1]})" if frames else ""
    return ((errors[-1] if errors else lines[-1] if lines else "") + where)[:200]


def probe_all(world_size: int = 2, extra: list[Probe] | None = None) -> list[dict]:
    """Run every probe on ``world_size`` CPU ranks; one table row each."""
    for module in PRELOAD:  # imported once here, so that the forked ranks inherit them
        with contextlib.suppress(Exception):  # the probe that needs it reports the error
            importlib.import_module(module)
    rows = []
    for probe in PROBES + list(extra or []):
        try:
            rows.append(_run(probe, world_size))
        except Exception:  # noqa: BLE001
            rows.append(
                {
                    "feature": probe.feature,
                    "runs on CPU": "no",
                    "error": traceback.format_exc(limit=1),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (what ``python -m cai_labs.colossal.probes`` prints)."""
    cols = ["feature", "runs on CPU", "shim", "compared with", "max abs difference", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    import colossalai

    print(f"Colossal-AI {colossalai.__version__} on 2 CPU ranks (gloo), measured in this run:")
    print(table(probe_all(2)))
