"""Every tutorial worker puts its model and data on ``cai_labs.device()`` (static check).

There is no GPU here, so a worker that leaves its model on the CPU still runs; on a GPU node
(process group ``cpu:gloo,cuda:nccl``) it would hand CPU tensors to NCCL or mix devices in one
op. This check reads each page with :mod:`ast` and, for every function passed to
``launch(fn, ...)`` together with the page functions it calls (transitively), requires:

1. the worker refers to ``device`` somewhere (it places something on the rank's device), unless
   it is a library entry point that places everything itself (:data:`SELF_PLACING`);
2. every tensor it creates with a factory (``torch.zeros``, ``torch.randn``, ...) gets
   ``device=`` or is moved at once with ``.to(...)``;
3. every model it builds (a class from ``cai_labs.models``, ``torch.nn``, ``transformers`` or
   ``diffusers``, or ``X.from_pretrained(...)``) is moved at once with ``.to(...)``, or handed
   straight to a library wrapper that places it (:data:`SELF_PLACING`).

Each rule is shown failing on a small page whose worker breaks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
# tutorial_06 (serving) launches no training workers, its engine places itself; tutorial_08
# (Colossal-AI's components) launches none.
NO_LAUNCH = ("tutorial_06", "tutorial_08")
PAGES = sorted(p for p in TUTORIALS.glob("tutorial_*.py") if not p.name.startswith(NO_LAUNCH))

# Tensor factories whose result must be put on a device. ``arange`` and ``randperm`` are left
# out: pages use them for indices into their datasets, which stay on the host.
FACTORIES = {
    "zeros", "ones", "empty", "full", "rand", "randn", "randint", "tensor", "linspace", "eye",
    "as_tensor",
}  # fmt: skip
MODEL_MODULES = ("cai_labs.models", "torch.nn", "transformers", "diffusers")
# Library entry points that put their model and data on device() themselves (tested with the
# library): a worker may call them, or be one, without naming device().
SELF_PLACING = {
    "ParallelGPT",
    "PipelinedSequenceBert",
    "race_tensor_parallel",
    "race_pipeline",
    "parallelize",
    "load_checkpoint",
    "task_batch",
}


def _model_classes(tree: ast.Module) -> set[str]:
    """Names bound on the page to model classes: ``from transformers import BertForMaskedLM``,
    ``from torch import nn`` (then ``nn.X``), ``from cai_labs.models import GPT``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                ours = full.startswith("cai_labs.models")  # resnet50(...) builds one too
                if full.startswith(MODEL_MODULES) and (
                    ours or alias.name[0].isupper() or full == "torch.nn"
                ):
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(MODEL_MODULES):
                    names.add(alias.asname or alias.name)
    return names


def _root_name(func: ast.expr) -> str | None:
    while isinstance(func, ast.Attribute):
        func = func.value
    return func.id if isinstance(func, ast.Name) else None


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _is_factory(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr in FACTORIES and _root_name(f) == "torch"


def _is_model(call: ast.Call, classes: set[str]) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr == "from_pretrained":
        return True
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    wrapper = "parallel." in ast.unparse(f)  # nn.parallel.DistributedDataParallel(model)
    built_by_us = isinstance(f, ast.Name) and f.id in classes  # GPT(...), resnet50(...)
    return (built_by_us or name[:1].isupper()) and _root_name(f) in classes and not wrapper


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _mentions_device(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id == "device")
        or (isinstance(n, ast.Attribute) and n.attr == "device")
        for n in ast.walk(node)
    )


def _moved(call: ast.Call, parent: dict) -> bool:
    """``call(...).to(device())`` (possibly after other ``.to(...)`` calls, e.g. a dtype)."""
    node = call
    while True:
        up = parent.get(node)
        if not (isinstance(up, ast.Attribute) and up.attr == "to"):
            return False
        node = parent.get(up)
        if not isinstance(node, ast.Call):
            return False
        if any(_mentions_device(a) for a in [*node.args, *node.keywords]):
            return True


def _handed_to_wrapper(call: ast.Call, parent: dict) -> bool:
    up = parent.get(call)
    return isinstance(up, ast.Call) and _callee(up) in SELF_PLACING


def _called(fn: ast.FunctionDef) -> list[str]:
    return [_callee(c) for c in ast.walk(fn) if isinstance(c, ast.Call)]


def _uses_device(fn: ast.FunctionDef) -> bool:
    return _mentions_device(fn)


def _referenced(node: ast.AST, functions: dict, tables: dict) -> list[str]:
    """Page functions ``node`` names: called, passed on, or held in a module-level table
    (``MAKERS = {"a": make_a}`` then ``for make in MAKERS.values(): make()``)."""
    names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    return [f for n in names for f in ([n] if n in functions else tables.get(n, []))]


def _closure(name: str, functions: dict, tables: dict) -> list[ast.FunctionDef]:
    """``name`` and every page function it refers to, transitively."""
    seen, todo = [], [name]
    while todo:
        fn = functions[todo.pop()]
        if fn not in seen:
            seen.append(fn)
            todo += _referenced(fn, functions, tables)
    return seen


def _tables(tree: ast.Module, functions: dict) -> dict[str, list[str]]:
    """Module-level names bound to containers of page functions."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Dict, ast.List, ast.Tuple)):
            held = _referenced(node.value, functions, {})
            for target in node.targets:
                if isinstance(target, ast.Name) and held:
                    out[target.id] = held
    return out


def _launched(tree: ast.Module) -> list[str]:
    return [
        node.args[0].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and _callee(node) == "launch"
        and node.args
        and isinstance(node.args[0], ast.Name)
    ]


def _worker_problems(worker: str, tree: ast.Module, functions: dict) -> list[str]:
    if worker not in functions:
        known = worker in SELF_PLACING
        return [] if known else [f"{worker}: not a page function nor in SELF_PLACING"]
    closure = _closure(worker, functions, _tables(tree, functions))
    problems = []
    hands_on = any(n in SELF_PLACING for fn in closure for n in _called(fn))
    if not hands_on and not any(_uses_device(fn) for fn in closure):
        problems.append(f"{worker}: never refers to device()")
    classes, parent = _model_classes(tree), _parents(tree)
    for fn in closure:
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            where = f"{worker} -> {fn.name}, line {call.lineno}"
            if _is_factory(call):
                if not any(k.arg == "device" for k in call.keywords) and not _moved(call, parent):
                    problems.append(f"{where}: {ast.unparse(call.func)}(...) without device=")
            elif _is_model(call, classes) and not (
                _moved(call, parent) or _handed_to_wrapper(call, parent)
            ):
                problems.append(f"{where}: {ast.unparse(call.func)}(...) not moved .to(...)")
    return problems


def device_problems(source: str) -> list[str]:
    """What keeps the workers of a page's ``source`` from being device-correct (empty: none)."""
    tree = ast.parse(source)
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    problems: list[str] = []
    for worker in dict.fromkeys(_launched(tree)):
        problems += _worker_problems(worker, tree, functions)
    return problems


def test_every_page_is_checked():
    assert len(PAGES) == 9
    for page in PAGES:
        assert _launched(ast.parse(page.read_text())), f"{page.name}: no launch(...) found"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name[:11])
def test_page_workers_place_model_and_data_on_device(page):
    problems = device_problems(page.read_text())
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


GOOD = """
import torch
from torch import nn
from cai_labs import device, launch
from cai_labs.models import MLP

def batch():
    return torch.randn(4, 8).to(device())

def worker():
    model = MLP(hidden=(8,)).to(device())
    buf = torch.zeros(3, device=device())
    return model(batch()).sum() + buf.sum()

launch(worker, 2)
"""


def test_a_correct_worker_passes():
    assert device_problems(GOOD) == []


@pytest.mark.parametrize(
    ("correct", "broken", "expected"),
    [
        # the model stays on the CPU
        ("MLP(hidden=(8,)).to(device())", "MLP(hidden=(8,))", "MLP(...) not moved"),
        # a layer built in the worker is a model too
        ("buf = ", "lin = nn.Linear(8, 8)\n    buf = ", "nn.Linear(...) not moved"),
        # a collective buffer on the CPU
        ("torch.zeros(3, device=device())", "torch.zeros(3)", "torch.zeros(...) without device="),
        # a batch made by a page function the worker calls
        ("torch.randn(4, 8).to(device())", "torch.randn(4, 8)", "batch, line"),
    ],
)
def test_a_worker_that_skips_device_fails(correct, broken, expected):
    assert correct in GOOD
    problems = device_problems(GOOD.replace(correct, broken))
    assert any(expected in p for p in problems), problems


def test_a_worker_that_never_names_device_fails():
    source = GOOD.replace(".to(device())", "").replace(", device=device()", ", device='cpu'")
    problems = device_problems(source)
    assert "worker: never refers to device()" in problems


def test_a_library_worker_must_be_known_to_place_itself():
    source = "from cai_labs import launch\nfrom somewhere import train\nlaunch(train, 2)\n"
    assert device_problems(source)
    assert device_problems(source.replace("train", "race_pipeline")) == []


# -- the library entry points in SELF_PLACING: placed on whatever device() says ----------------
# device() is the CPU on this machine, so a model left on the CPU would pass unnoticed. Here
# device() is patched to answer ``meta`` (a device without data): whatever the entry point puts
# on device() ends up there, and anything it forgets stays on the CPU, where the test sees it.

META = torch.device("meta")


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def test_parallel_gpt_puts_its_weights_and_batches_on_device(monkeypatch):
    import cai_labs.hybrid.apply as apply
    import cai_labs.hybrid.model as hybrid_model
    from cai_labs.hybrid import Layout, parallelize
    from cai_labs.models.gpt import GPT, GPTConfig

    for module in (apply, hybrid_model):
        monkeypatch.setattr(module, "device", lambda: META)
    cfg = GPTConfig(vocab_size=16, d_model=16, n_heads=2, seq_len=8)
    model = parallelize(GPT(cfg), Layout())
    assert _devices(model) == {"meta"}
    moved = []

    class Stop(Exception):
        pass

    def shard_batch(*tensors, **kwargs):  # the step's first use of the batch
        moved.extend(tensors)
        raise Stop

    monkeypatch.setattr(hybrid_model, "shard_batch", shard_batch)
    ids = torch.zeros(2, cfg.seq_len, dtype=torch.long)
    with pytest.raises(Stop):
        model.train_step(ids, ids, None)
    assert [t.device for t in moved] == [META, META]


def test_the_opt_recipe_loads_and_batches_on_device(monkeypatch, tmp_path):
    import cai_labs.recipes.opt_finetune as recipe
    from cai_labs.data.reverse_task import ReverseTask
    from cai_labs.models.opt import tiny_opt, train_char_tokenizer

    tok = train_char_tokenizer("reverse abcdefgh => .")
    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32)
    tiny_opt(tok, max_position_embeddings=32, **sizes).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(recipe, "device", lambda: META)
    model, _ = recipe.load_checkpoint(tmp_path)
    assert _devices(model) == {"meta"}
    x, y = recipe.task_batch(tok, ReverseTask(("ab",), ("ba",)), ["ab"])
    assert x.device == y.device == META


def test_a_chunk_is_on_device_and_its_home_on_the_host(monkeypatch):
    import cai_labs.offload.chunk as chunk

    monkeypatch.setattr(chunk, "rank_device", lambda: META)
    c = chunk.Chunk("param", 0, 8)
    assert c.data.device == META and c.host.device.type == "cpu"


def test_lightning_trains_on_the_ranks_own_gpu_when_device_is_one(monkeypatch):
    import cai_labs.lightning.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer.pl, "Trainer", lambda **kw: seen.update(kw))
    monkeypatch.setattr(trainer, "make_strategy", lambda *a, **kw: None)
    trainer.rank_trainer("ddp")
    assert (seen["accelerator"], seen["devices"]) == ("cpu", 1)
    monkeypatch.setattr(trainer, "device", lambda: torch.device("cuda", 3))
    trainer.rank_trainer("ddp")
    assert (seen["accelerator"], seen["devices"]) == ("gpu", [3])
