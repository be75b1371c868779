"""``python -m cai_labs.scale``: memory per GPU and step time of one model, GPU and layout."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cai_labs.scale.hardware import GPUS
from cai_labs.scale.layout import ScaleLayout
from cai_labs.scale.models import MODELS, ModelShape, custom_model, get_model
from cai_labs.scale.predict import Prediction, predict

CUSTOM = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cai_labs.scale", description=__doc__)
    p.add_argument("--model", default=None, help=f"preset: {', '.join(MODELS)}")
    for name in CUSTOM:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--gpus", type=int, required=True)
    for name in ("dp", "tp", "pp", "sp"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--tp-mode", default="1d", choices=["1d", "2d", "2.5d", "3d"])
    p.add_argument("--tp-depth", type=int, default=1, help="depth d of 2.5D")
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved"])
    p.add_argument("--microbatches", type=int, default=None)
    p.add_argument("--chunks", type=int, default=1, help="model chunks per stage (interleaved)")
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--offload", action="store_true", help="optimizer state in host memory")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def _model(args: argparse.Namespace) -> ModelShape:
    given = {k: getattr(args, k) for k in CUSTOM if getattr(args, k) is not None}
    base = get_model(args.model) if args.model else None
    if not given:
        if base is None:
            raise ValueError("give --model PRESET or a custom shape (--layers --hidden ...)")
        return base
    shape = {k: getattr(base, k) for k in CUSTOM} if base else {}
    shape.update(given)
    missing = [k for k in ("layers", "hidden", "heads", "vocab") if shape.get(k) is None]
    if missing:
        raise ValueError(f"a custom shape needs --{' --'.join(missing)}")
    return custom_model(
        shape["layers"],
        shape["hidden"],
        shape["heads"],
        shape["vocab"],
        kv_heads=shape.get("kv_heads"),
        ffn=shape.get("ffn"),
        seq=args.seq or (base.seq if base else 2048),
        base=base,
    )


def run(argv: Sequence[str] | None = None) -> Prediction:
    args = parser().parse_args(argv)
    model = _model(args)
    layout = ScaleLayout(
        dp=args.dp,
        tp=args.tp,
        tp_mode=args.tp_mode,
        tp_depth=args.tp_depth,
        pp=args.pp,
        schedule=args.schedule,
        microbatches=args.microbatches,
        chunks=args.chunks,
        sp=args.sp,
        zero=args.zero,
        offload=args.offload,
        recompute=args.recompute,
        precision=args.precision,
        micro_batch_size=args.micro_batch_size,
        global_batch=args.global_batch,
        seq=args.seq,
    )
    if layout.gpus != args.gpus:
        layout.validate(model, args.gpus)  # raises the product error
    return predict(model, args.gpu, layout)


def _text(p: Prediction) -> str:
    m = p.memory_per_gpu_bytes
    lines = [f"{p.model} on {p.gpus} x {p.gpu}"]
    lines += [f"  {k:<12} {v / 2**30:10.2f} GiB" for k, v in m.items() if k != "host_optimizer"]
    if p.step_time_s is not None:
        lines.append(f"  step time    {p.step_time_s:10.3f} s (bound: {p.bound})")
        lines.append(f"  tokens/s/GPU {p.tokens_per_s_per_gpu:10.1f}   MFU {p.mfu:.1%}")
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        p = run(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict(), indent=2) if parser().parse_args(argv).json else _text(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
