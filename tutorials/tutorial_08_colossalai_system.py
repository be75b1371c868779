"""
Colossal-AI 0.5.0 as a system: its components, and what of it runs on CPU
==========================================================================

See Colossal-AI 0.5.0 as one system of launcher, Booster plugins, ShardFormer, Gemini and
friends, each next to its ``cai_labs`` twin, and run against that twin what of it runs on CPU.

The other pages teach one technique each and show, at the end, the Colossal-AI code that does
it on GPUs. This page puts those pieces together: how a Colossal-AI training script is
launched, what the ``Booster`` and its plugins do, where ShardFormer, Gemini, the pipeline
schedules, checkpoint I/O, auto-parallel and the inference engine sit, and, for each, the
``cai_labs`` module that implements the same idea here, the tutorial that teaches it, and its
Colossal-AI snippet, checked against the installed release.

It then runs every Colossal-AI component that can run on CPU ranks against its twin, and shows
the error that stops the others.

**In this tutorial** you will

1. see the components as layers of one system;
2. check every Colossal-AI snippet and API named on this site against the installed release;
3. run what runs on CPU (the Booster with DDP, tensor parallelism through ShardFormer, lazy
   initialisation, checkpoint I/O) against its twin, and read why the rest needs CUDA.

**Prerequisites:** data parallelism from :doc:`tutorial_00_data_parallel`; the other tutorials
explain each component this page places (none is needed to run it).
"""

# %%
# Set-up
# ------
# Colossal-AI 0.5.0 pins ``torch<=2.5.1``; this site installs it without its pins next to
# torch 2.13 (``nox -s colossalai`` and the site build do the same).

import time
import warnings
from dataclasses import replace

import matplotlib.pyplot as plt
import pandas as pd

from cai_labs import build_env
from cai_labs.colossal import checked_here
from cai_labs.colossal.components import COMPONENTS, draw
from cai_labs.exercises import Exercises

page_start = time.perf_counter()
pd.set_option("display.max_colwidth", None)  # the tables' cells whole
warnings.filterwarnings("ignore", module=r"colossalai\.")  # its notes about CUDA-only kernels
try:
    import colossalai

    VERSION = colossalai.__version__
except Exception as exc:  # not installed, or installed against another torch
    VERSION = f"not importable here ({type(exc).__name__})"
print("colossalai:", VERSION)
print(build_env.describe(ranks=2))  # where this page's numbers were measured (2 ranks)

# %%
# The components
# --------------
# A script starts its processes with the launcher (``colossalai run --nproc_per_node 8
# train.py``, which is ``torchrun`` with host files, and ``colossalai.launch_from_torch()``
# inside the script). It then hands model, optimizer, loss and data loader to
# ``colossalai.booster.Booster``; a *plugin* decides what ``booster.boost`` does to them: DDP
# (``TorchDDPPlugin``), ZeRO-1/2 (``LowLevelZeroPlugin``), ZeRO-3 over chunks with offload
# (``GeminiPlugin``, with its chunk manager ``colossalai.zero.gemini.ChunkManager`` and the
# CPU/GPU ``colossalai.nn.optimizer.HybridAdam``), PyTorch FSDP (``TorchFSDPPlugin``), or tensor
# x pipeline x sequence x data parallelism (``HybridParallelPlugin``, and
# ``MoeHybridParallelPlugin`` with expert parallelism). The hybrid plugins shard Hugging Face
# models through ShardFormer (``colossalai.shardformer.ShardFormer``), whose per-model
# *policies* say which layer becomes which parallel layer. Around the loop sit checkpoint I/O
# (``booster.save_model``, sharded), lazy initialisation, auto-parallel and the inference engine.

fig, ax = plt.subplots(figsize=(10, 4.2))
draw(ax)
ax.set_title(f"Colossal-AI {VERSION}: the layers a training script goes through")
fig.tight_layout()

# %%
# Each component, its cai_labs twin, its tutorial and its checked snippet
# -----------------------------------------------------------------------
# The table is built from :data:`cai_labs.colossal.components.COMPONENTS`; ``nox -s colossalai``
# resolves every API in it against the release and checks that each snippet exists on its page.

pd.DataFrame(
    [
        {
            "component": c.name,
            "Colossal-AI 0.5.0 API": ", ".join(c.apis),
            "cai_labs module": c.module,
            "tutorial": c.tutorial,
            "checked snippet": c.snippet,
        }
        for c in COMPONENTS
    ]
)

# %%
# The same links, to follow:
#
# - launcher: :mod:`cai_labs.launcher` (``launch``, ``device``), :doc:`tutorial_00_data_parallel`
# - Booster + ``TorchDDPPlugin``: :mod:`cai_labs.data_parallel`, :doc:`tutorial_00_data_parallel`
# - ``LowLevelZeroPlugin``, ``TorchFSDPPlugin``: :mod:`cai_labs.zero`,
#   :doc:`tutorial_05_opt_zero_offload`
# - ``GeminiPlugin`` (chunks, ``HybridAdam``): :mod:`cai_labs.offload`,
#   :doc:`tutorial_05_opt_zero_offload`
# - ``HybridParallelPlugin``: :mod:`cai_labs.hybrid` and :mod:`cai_labs.pipeline`,
#   :doc:`tutorial_01_multidim_parallel`
# - ShardFormer and its policies: :mod:`cai_labs.tensor_parallel.opt_1d`,
#   :doc:`tutorial_05_opt_zero_offload`; sequence parallelism: :mod:`cai_labs.sequence_parallel`,
#   :doc:`tutorial_02_sequence_parallel`
# - ``MoeHybridParallelPlugin``: :mod:`cai_labs.moe`, :doc:`tutorial_10_expert_parallel`;
#   snippet below
# - Lars, Lamb: :mod:`cai_labs.optim`, :doc:`tutorial_04_large_batch`
# - checkpoint I/O and lazy initialisation: :mod:`cai_labs.recipes.opt_finetune` (save and reload
#   with ``save_pretrained``), snippet below
# - auto-parallel: :mod:`cai_labs.auto_parallel`, :doc:`tutorial_03_auto_parallel`
# - inference engine: :mod:`cai_labs.serving`, :doc:`tutorial_06_serving`
#
# Two components have their snippet here. **Checked against colossalai 0.5.0, needs CUDA**:
# expert parallelism through ``MoeHybridParallelPlugin`` on a small Mixtral.


def colossalai_moe(steps: int = 10) -> None:
    """EP 4 x ZeRO-1 for a small Mixtral: ``colossalai run --nproc_per_node 8 train.py``."""
    import colossalai
    import torch
    from colossalai.booster import Booster
    from colossalai.booster.plugin import MoeHybridParallelPlugin
    from transformers import MixtralConfig, MixtralForCausalLM

    colossalai.launch_from_torch()
    config = MixtralConfig(hidden_size=128, intermediate_size=256, num_local_experts=4)
    model = MixtralForCausalLM(config)
    plugin = MoeHybridParallelPlugin(tp_size=1, pp_size=1, ep_size=4, zero_stage=1)
    booster = Booster(plugin=plugin)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, *_ = booster.boost(model, optimizer)
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (8, 128), device="cuda")
        booster.backward(model(input_ids=ids, labels=ids).loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()


print(checked_here(colossalai_moe))

# %%
# Checkpoint I/O through the Booster, with lazy initialisation: the model is built without
# memory and materialised by ``boost`` already sharded. The same calls run on CPU in the table
# further down (``GeneralCheckpointIO``, ``LazyInitContext``); this version, with Gemini,
# needs CUDA: **checked against colossalai 0.5.0, needs CUDA**.


def colossalai_checkpoint(model_dir: str, out_dir: str) -> None:
    """Lazy-build OPT, boost with Gemini, save model and optimizer sharded, load them back."""
    import colossalai
    import torch
    from colossalai.booster import Booster
    from colossalai.booster.plugin import GeminiPlugin
    from colossalai.lazy import LazyInitContext
    from colossalai.nn.optimizer import HybridAdam
    from transformers import OPTForCausalLM

    colossalai.launch_from_torch()
    with LazyInitContext(default_device=torch.device("cuda")):
        model = OPTForCausalLM.from_pretrained(model_dir)
    booster = Booster(plugin=GeminiPlugin())
    model, optimizer, *_ = booster.boost(model, HybridAdam(model.parameters(), lr=1e-4))
    booster.save_model(model, f"{out_dir}/model", shard=True, size_per_shard=1024)
    booster.save_optimizer(optimizer, f"{out_dir}/optimizer", shard=True)
    booster.load_model(model, f"{out_dir}/model")
    booster.load_optimizer(optimizer, f"{out_dir}/optimizer")


print(checked_here(colossalai_checkpoint))

# %%
# Every snippet and every named API, checked
# ------------------------------------------
# :func:`cai_labs.colossal.check.check_site` finds every Colossal-AI snippet of the site (the
# functions that import ``colossalai`` on every tutorial), resolves its imports, binds each call
# to the installed signature, runs pyflakes over it, and resolves every ``colossalai.…`` name
# the pages write. Where colossalai is installed, this cell runs it.

if not VERSION[0].isdigit():
    print("colossalai is not importable here: `nox -s colossalai` runs this check")
else:
    from cai_labs.colossal.check import check_site

    results, name_problems, names = check_site()
    failed = [label for label, r in results.items() if not r.ok] + list(name_problems)
    print(
        f"{len(results)} snippets on {len({k.split(':')[0] for k in results})} pages: "
        f"{sum(r.imports for r in results.values())} imports resolve, "
        f"{sum(r.calls for r in results.values())} calls bind; {names} named APIs resolve; "
        f"failed: {failed or 'none'}"
    )
    assert not failed, (failed, name_problems)

# %%
# What runs on CPU here
# ---------------------
# :func:`cai_labs.colossal.probes.probe_all` runs each component on 2 CPU ranks (gloo) and
# compares it with its twin, in float64 where the feature allows: the Booster plugins with one
# SGD step of :mod:`cai_labs.data_parallel`, tensor parallelism with the serial OPT (loss and
# every gradient, each rank's slice), lazy initialisation with eager initialisation, a sharded
# checkpoint with the model it saved. Where a feature stops, the row shows the error. One shim
# is used, by the two tensor-parallel rows: Colossal-AI's CPU accelerator passes a device to
# ``torch.get_rng_state()`` and refuses ``manual_seed``;
# :func:`~cai_labs.colossal.probes.cpu_rng_shim` gives it the CPU generator's own two calls.

if VERSION[0].isdigit():
    from cai_labs.colossal.probes import probe_all

    rows = pd.DataFrame(probe_all(2)).set_index("feature")
    ran = rows.index[rows["runs on CPU"] == "yes"].tolist()
    print(f"ran on 2 CPU ranks in this build: {len(ran)} of {len(rows)}: {', '.join(ran)}")
else:
    rows = pd.DataFrame()
rows

# %%
# The tensor-parallel rows need the release's own transformers, 4.51.3: ShardFormer's OPT policy
# imports ``transformers.modeling_attn_mask_utils``, which transformers 5 removed, and the rest
# of this site is built with transformers 5. Where the build has transformers 5, those rows show
# that import error, and ``nox -s colossalai`` (transformers 4.51.3) runs them and asserts the
# match (``tests/test_colossalai_probes.py``; it prints this same table). The rows that stop
# with a CUDA error are what the pages label "checked against colossalai 0.5.0, needs CUDA".

import transformers

tp = [f for f in rows.index if "tensor parallel" in f or "(TP)" in f]
print(f"transformers {transformers.__version__} in this build; tensor-parallel rows:")
for feature in tp:
    print(f"  {feature}: {rows.loc[feature, 'runs on CPU']} {rows.loc[feature, 'error']}")

# %%
# At real scale
# -------------
# What each Booster plugin is for, at a size that needs it: OPT-13B in bf16 with fp32 master
# weights on 8 A100 80 GB, 64 sequences of 2,048 tokens per step, full recomputation, each
# plugin as the layout it applies. **Modeled** by :mod:`cai_labs.scale` (the same byte formulas
# the tests check against the ledger on CPU ranks), not measured in this build.

from cai_labs.scale import ScaleLayout, predict

PLUGINS = {
    "TorchDDPPlugin (replicas)": ScaleLayout(dp=8),
    "LowLevelZeroPlugin stage 2": ScaleLayout(dp=8, zero=2),
    "GeminiPlugin (ZeRO-3 chunks)": ScaleLayout(dp=8, zero=3),
    "GeminiPlugin + CPU offload": ScaleLayout(dp=8, zero=3, offload=True),
    "HybridParallelPlugin TP2 x PP2": ScaleLayout(dp=2, tp=2, pp=2, zero=1),
}
scale_rows = []
for plugin, layout in PLUGINS.items():
    p = predict("opt-13b", "a100-80gb", replace(layout, global_batch=64, recompute="full"))
    scale_rows.append(
        {
            "plugin": plugin,
            "GB per GPU": p.memory_per_gpu_bytes["total"] / 1e9,
            "fits 80 GB": p.fits,
            "step (s)": p.step_time_s,
            "MFU": p.mfu,
        }
    )
fitting = [r["plugin"] for r in scale_rows if r["fits 80 GB"]]
print(f"{len(fitting)} of {len(scale_rows)} plugins fit OPT-13B on 8 x 80 GB; the replicas do not")
assert scale_rows[0]["fits 80 GB"] is False and len(fitting) == len(scale_rows) - 1
pd.DataFrame(scale_rows).set_index("plugin").style.format(precision=2)

# %%
# Predict, then check
# -------------------
# Answer each question before opening its answer; the answers are this build's numbers.

exercises = Exercises()
if VERSION[0].isdigit():
    error = rows.loc["Booster + GeminiPlugin", "error"]
    stopped = error.strip().splitlines()[-1] if isinstance(error, str) else "nothing: it ran"
    exercises.add(
        f"Of the {len(rows)} Colossal-AI features probed, how many run on 2 CPU ranks here?",
        f"{len(ran)}: {', '.join(ran)}.",
    )
    exercises.add(
        "GeminiPlugin (ZeRO-3 over chunks) is asked to boost a model on CPU ranks. What stops it?",
        f"{stopped}",
    )
    exercises.add(
        "How many Colossal-AI snippets does this site carry, and how many of their calls bind to "
        "the installed signatures?",
        f"{len(results)} snippets; {sum(r.calls for r in results.values())} calls bind, "
        f"{sum(r.imports for r in results.values())} imports resolve; failed: {failed or 'none'}.",
    )
exercises

# %%
# Two more to try on your own machine:
#
# - remove the shim (call ``probes.shardformer_opt`` directly under ``launch``) and predict the
#   error; ``tests/test_colossalai_probes.py`` does it;
# - break a snippet: change ``logical_mesh_shape`` to ``device_mesh`` in tutorial 03's
#   ``colossalai_autoparallel`` and run ``python -m cai_labs.colossal.check``.

print(f"page executed in {time.perf_counter() - page_start:.0f} s")
