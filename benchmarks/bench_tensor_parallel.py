"""cai_labs tensor and pipeline parallel against PyTorch's own engines, on the same GPT.

Prints, from one run, the step-time ratios

* cai_labs 1D tensor parallel / DTensor ``ColwiseParallel``+``RowwiseParallel`` (TP ranks),
* cai_labs pipeline (1F1B) / ``torch.distributed.pipelining`` ``Schedule1F1B`` (PP ranks),

with the goal (<= 1.0: not slower than PyTorch) printed next to each. Both engines of a pair run
in the same processes on the same batches, alternating steps; their losses must agree. Times
are medians over steps after a warm-up; nothing is asserted on time.

    PYTHONPATH=src python benchmarks/bench_tensor_parallel.py [--steps 20] [--d-model 128]
"""

from __future__ import annotations

import argparse

from cai_labs import launch
from cai_labs.data.char_corpus import load_char_corpus
from cai_labs.models.gpt import GPTConfig
from cai_labs.peers.race import race_pipeline, race_tensor_parallel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", type=int, default=4)
    args = ap.parse_args()

    cfg = GPTConfig(
        vocab_size=64, seq_len=64, d_model=args.d_model, n_heads=4, n_layers=args.layers
    )
    corpus = load_char_corpus(vocab_size=cfg.vocab_size)

    def batches(step: int):
        return corpus.batch(step, args.batch, cfg.seq_len)

    print(f"model: {cfg}; batch {args.batch}; {args.steps} steps (median after 1 warm-up)")
    rows = []
    tp = launch(race_tensor_parallel, args.tp, cfg, batches, args.steps, 1e-3)
    rows.append((f"1D tensor parallel, {args.tp} ranks", "DTensor Colwise/RowwiseParallel", tp))
    pp = launch(race_pipeline, args.pp, cfg, batches, args.steps, 1e-3, args.micro, "1f1b")
    rows.append(
        (
            f"pipeline 1F1B, {args.pp} stages x {args.micro} micro-batches",
            "torch.distributed.pipelining Schedule1F1B",
            pp,
        )
    )
    print(
        f"{'cai_labs':48s} {'PyTorch':44s} {'ours ms':>8s} {'torch ms':>8s} "
        f"{'ratio':>6s} {'goal':>6s} {'max |loss diff|':>15s}"
    )
    for ours_name, theirs_name, r in rows:
        a, b = r["cai_labs"], r["pytorch"]
        gap = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        ratio = a["step_s"] / b["step_s"]
        print(
            f"{ours_name:48s} {theirs_name:44s} {1e3 * a['step_s']:8.2f} "
            f"{1e3 * b['step_s']:8.2f} {ratio:6.2f} {'<= 1.0':>6s} {gap:15.1e}"
        )


if __name__ == "__main__":
    main()
