"""The scale model: built on the technique formulas, checked against published runs, and
refusing impossible layouts with the CPU code's errors."""

from __future__ import annotations

import json
import re

import pytest

from cai_labs.scale import MODELS, ScaleLayout, predict
from cai_labs.scale.__main__ import main
from cai_labs.scale.models import custom_model, get_model
from cai_labs.scale.published import all_rows, throughput_rows
from cai_labs.tensor_parallel.grid import check_divisible, grid_shape

#: Memory rows within 3 % of the published number; at least 8 throughput rows within 25 %.
MEMORY_GOAL, THROUGHPUT_GOAL, THROUGHPUT_ROWS = 0.03, 0.25, 8


def _args(line: str) -> list[str]:
    return line.split()


def _table(rows) -> str:
    lines = [f"{'source':28} {'config':52} {'published':>10} {'predicted':>10} {'ratio':>6}"]
    for r in rows:
        pred = "-" if r.predicted is None else f"{r.predicted:10.4g}"
        ratio = "-" if r.ratio is None else f"{r.ratio:6.3f}"
        lines.append(f"{r.source:28} {r.config:52} {r.published:10.4g} {pred:>10} {ratio:>6}")
    return "\n".join(lines)


def test_memory_rows_within_goal():
    rows = [r for r in all_rows() if r.kind == "memory"]
    print(_table(rows))
    assert len(rows) >= 80
    worst = max(abs(r.ratio - 1) for r in rows)
    assert worst <= MEMORY_GOAL, _table([r for r in rows if abs(r.ratio - 1) > MEMORY_GOAL])


def test_throughput_rows_within_goal():
    rows = throughput_rows()
    print(_table(rows))
    modeled = [r for r in rows if r.modeled]
    within = [r for r in modeled if abs(r.ratio - 1) <= THROUGHPUT_GOAL]
    print(f"{len(within)} of {len(modeled)} modeled rows within {THROUGHPUT_GOAL:.0%}")
    assert len(within) >= THROUGHPUT_ROWS
    for r in rows:  # every row not modeled, or far off, says why
        assert r.why or (r.modeled and abs(r.ratio - 1) <= THROUGHPUT_GOAL)


def test_scale_model_uses_the_technique_formulas():
    """No second copy: the scale model calls the functions the ledger tests check."""
    import cai_labs.scale.memory as mem
    import cai_labs.scale.step as step
    from cai_labs.pipeline import formulas as pipe
    from cai_labs.sequence_parallel import formulas as sp
    from cai_labs.tensor_parallel import formulas as tp
    from cai_labs.zero import formulas as zero

    assert mem.zero_memory_formula is zero.zero_memory_formula
    assert mem.layer_activation_bytes is tp.layer_activation_bytes
    assert mem.linear_cost is tp.linear_cost
    assert mem.in_flight_microbatches is pipe.in_flight_microbatches
    assert step.bubble_fraction is pipe.bubble_fraction
    assert step.attention_sent_bytes is sp.attention_sent_bytes
    assert step.zero_sent_factor is zero.zero_sent_factor


def test_broken_activation_formula_is_caught(monkeypatch):
    """Dropping the attention scores from the activation formula breaks the published check."""
    import cai_labs.scale.published as published
    from cai_labs.tensor_parallel.formulas import layer_activation_bytes

    def broken(seq, batch, hidden, heads, tp=1, sp=False, recompute="none", **kw):
        return layer_activation_bytes(seq, batch, hidden, heads, tp, sp, "selective", **kw)

    monkeypatch.setattr(published, "layer_activation_bytes", broken)
    rows = published.korthikanti_memory_rows()
    assert max(abs(r.ratio - 1) for r in rows) > MEMORY_GOAL


def test_more_parallelism_needs_less_memory():
    base = dict(global_batch=64, recompute="selective")
    one = predict("gpt-3-175b", "a100-80gb", ScaleLayout(tp=8, pp=8, **base))
    zero = predict("gpt-3-175b", "a100-80gb", ScaleLayout(tp=8, pp=4, dp=2, zero=1, **base))
    m1, m2 = one.memory_per_gpu_bytes, zero.memory_per_gpu_bytes
    assert m2["optimizer"] < 2 * m1["optimizer"] / 2 + 1  # ZeRO-1 halves twice the stage state
    off = predict("opt-13b", "a100-80gb", ScaleLayout(dp=8, zero=2, offload=True, global_batch=8))
    assert off.memory_per_gpu_bytes["optimizer"] == 0 and off.memory_per_gpu_bytes["host_optimizer"]


def test_cli_json_has_the_keys():
    argv = _args(
        "--model llama-3-70b --gpu h100 --gpus 64 --tp 8 --pp 4 --dp 2 --zero 1 "
        "--recompute selective --seq 8192 --micro-batch-size 1 --global-batch 512 --json"
    )
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    out = json.loads(buf.getvalue())
    assert set(out["memory_per_gpu_bytes"]) >= {"params", "grads", "optimizer", "activations"}
    assert "total" in out["memory_per_gpu_bytes"]
    for key in ("step_time_s", "tokens_per_s_per_gpu", "mfu", "bound"):
        assert key in out
    assert 0 < out["mfu"] < 1


def test_cli_custom_shape_and_every_preset_runs(capsys):
    shape = "--layers 4 --hidden 256 --heads 8 --kv-heads 2 --vocab 1000 --gpus 2 --tp 2"
    assert main(_args(shape)) == 0
    for name in MODELS:
        assert main(["--model", name, "--gpus", "8", "--dp", "8", "--global-batch", "8"]) == 0


def _cpu_error(fn, *args) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args)
    return str(e.value)


@pytest.mark.parametrize(
    "argv, cpu",
    [
        ("--model llama-3-70b --gpus 48 --tp 3 --dp 16", (check_divisible, "heads", 64, 3, "1D")),
        ("--model gpt-3-175b --gpus 64 --tp 8 --tp-mode 2d --dp 8", (grid_shape, "2d", 8)),
        ("--model gpt-3-175b --gpus 64 --tp 4 --tp-mode 3d --dp 16", (grid_shape, "3d", 4)),
    ],
)
def test_impossible_layouts_give_the_cpu_errors(argv, cpu, capsys):
    assert main(argv.split()) == 2
    assert _cpu_error(*cpu) in capsys.readouterr().err


def test_product_of_sizes_must_be_the_gpu_count(capsys):
    assert main(["--model", "llama-3-8b", "--gpus", "64", "--tp", "8", "--dp", "4"]) == 2
    assert "make the product equal the GPU count" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not split into dp=3"):
        predict("llama-3-8b", "h100", ScaleLayout(dp=3, global_batch=8))


def _shown_digits(x: float) -> float:
    """One unit of the last digit a typed table entry shows (31.4 -> 0.1, 4011 -> 1)."""
    text = repr(float(x)).rstrip("0").rstrip(".")
    return 10.0 ** -(len(text.split(".")[1]) if "." in text else 0)


def test_zero_table_1_as_typed_follows_the_papers_closed_form():
    """A typo check of the typed table: ZeRO's Table 1 is its closed form (2 + 2 + K) psi / N_d
    with K = 12, written here independently of the project's formulas, shown to 3-4 digits."""
    from cai_labs.scale.published import _PSI, ZERO_TABLE_1

    for n, models in ZERO_TABLE_1.items():
        for model, typed in models.items():
            psi = _PSI[model] / 1e9
            exact = (4 + 12 / n) * psi, (2 + 14 / n) * psi, 16 / n * psi
            for t, e in zip(typed, exact):
                assert abs(t - e) < _shown_digits(t), (n, model, t, e)


def test_the_typo_check_catches_a_typo(monkeypatch):
    from cai_labs.scale import published

    table = {n: dict(m) for n, m in published.ZERO_TABLE_1.items()}
    table[64]["7.5B"] = (31.4, 16.6, 1.38)  # one digit wrong
    monkeypatch.setattr(published, "ZERO_TABLE_1", table)
    with pytest.raises(AssertionError):
        test_zero_table_1_as_typed_follows_the_papers_closed_form()


@pytest.mark.parametrize(
    "layout, gpus, message",
    [
        (ScaleLayout(dp=0), 1, "dp must be a positive integer; got 0"),
        (ScaleLayout(tp=1.5), 1, "tp must be a positive integer; got 1.5"),
        (ScaleLayout(chunks=0), 1, "chunks must be a positive integer"),
        (ScaleLayout(micro_batch_size=0), 1, "micro_batch_size must be a positive integer"),
        (ScaleLayout(dp=2, tp=2), 8, "2 x 2 x 1 x 1 = 4 GPUs, but --gpus is 8"),
        (ScaleLayout(schedule="zigzag"), 1, "schedule must be one of"),
        (ScaleLayout(recompute="some"), 1, "recompute must be one of"),
        (ScaleLayout(precision="fp8"), 1, "precision must be one of"),
        (ScaleLayout(zero=4), 1, "zero must be 0 (data parallel), 1, 2 or 3; got 4"),
        (ScaleLayout(dp=2, global_batch=3), 2, "use a multiple of 2"),
        (ScaleLayout(global_batch=0), 1, "gives no micro-batch per replica"),
        (ScaleLayout(pp=2, schedule="zb-h1", microbatches=1), 2, "at least as many micro-batches"),
        (ScaleLayout(pp=64, microbatches=64), 64, "the model has 32. Lower pp"),
        (ScaleLayout(tp=3), 3, "heads=32"),
        (ScaleLayout(sp=3, seq=8192), 3, "does not split over sp=3 ranks"),
    ],
)
def test_each_impossible_layout_says_what_to_change(layout, gpus, message):
    """Every branch of ``ScaleLayout.validate`` on Llama 3 8B (32 layers, 32 heads, 8 KV heads)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        layout.validate(get_model("llama-3-8b"), gpus)


def test_tp_that_splits_the_kv_heads_unevenly_says_so():
    """12 heads in 4 KV groups: tp=6 neither divides 4 nor is a multiple of it."""
    model = custom_model(2, 768, 12, 1000, kv_heads=4, ffn=3072)
    with pytest.raises(ValueError, match="tp=6 neither divides nor is a multiple of kv_heads=4"):
        ScaleLayout(tp=6).validate(model, 6)
    ScaleLayout(tp=2).validate(model, 2)
    ScaleLayout(tp=12).validate(model, 12)


def test_a_possible_layout_validates():
    """The boundary cases of the checks above are allowed."""
    model = get_model("llama-3-8b")
    ScaleLayout(tp=8, pp=32, dp=1, microbatches=32).validate(model, 256)
    ScaleLayout(tp=4, sp=2, seq=8192, dp=2, global_batch=2).validate(model, 16)
    ScaleLayout(pp=2, schedule="zb-h1", microbatches=2, zero=3).validate(model, 2)
