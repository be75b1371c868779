"""Serving throughput with dynamic batching on vs off, at concurrency 16 (goal: >= 3x).

Serves the fine-tuned OPT checkpoint of the fine-tuning recipe (made here in a few seconds, or
``--checkpoint DIR`` for another ``save_pretrained`` directory) twice, each time in its own
``python -m cai_labs.serving`` process on a free loopback port: once with ``--max-batch-size 16``,
once with ``--max-batch-size 1`` (batching off). The result cache is off in both, so every request
reaches the model. A bounded closed-loop load of ``--requests`` requests from 16 concurrent
clients measures throughput and p50/p99 latency. Prints the measured ratio next to the goal;
never asserts on wall-clock time (this machine's cores may be shared).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from cai_labs.serving import ServerProcess, load_test

GOAL = 3.0
NEW_TOKENS = 32  # per request, end-of-text ignored: every request costs the same decoding steps


def payloads(checkpoint) -> list[dict]:
    """One greedy request per test word of the fine-tuning task (or generic prompts)."""
    import json
    from pathlib import Path

    meta = Path(checkpoint) / "metrics.json"
    if meta.is_file():
        from cai_labs.recipes.opt_finetune import FinetuneConfig

        task = FinetuneConfig(**json.loads(meta.read_text())["finetune"]).task()
        return [{"prompt": task.prompt(w), "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
                for w in task.test_words]
    return [{"prompt": f"Return a copy of item {i}", "max_new_tokens": NEW_TOKENS,
             "ignore_eos": True} for i in range(64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="save_pretrained dir (default: make)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320, help="requests per run (bound)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per run (bound)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch

            from cai_labs.recipes.opt_finetune import make_finetuned_checkpoint

            torch.set_num_threads(1)
            start = time.perf_counter()
            checkpoint = make_finetuned_checkpoint(tmp)
            print(f"fine-tuned OPT checkpoint made in {time.perf_counter() - start:.1f} s")
        work = payloads(checkpoint)
        results = {}
        for name, batch in (("batching on", args.concurrency), ("batching off", 1)):
            server = ServerProcess(checkpoint, ["--threads", "1", "--cache-size", "0",
                                                "--max-batch-size", str(batch),
                                                "--max-wait-ms", "50",
                                                "--queue-size", str(4 * args.concurrency)])
            with server as url:
                load_test(url, work[:8], concurrency=4, max_requests=8)  # warm-up
                results[name] = load_test(url, work, concurrency=args.concurrency,
                                          max_requests=args.requests,
                                          time_limit_s=args.time_limit)
                import httpx

                seen = httpx.get(f"{url}/metrics").json()["mean_batch_size"]
            r = results[name]
            print(f"serving {name:12s} (max batch {batch:2d}) concurrency {r.concurrency}: "
                  f"{r.ok}/{r.sent} ok in {r.seconds:.2f} s, {r.throughput_rps:7.1f} req/s, "
                  f"p50 {r.p50_ms:7.1f} ms, p99 {r.p99_ms:7.1f} ms, mean batch {seen:.1f}")
        ratio = results["batching on"].throughput_rps / results["batching off"].throughput_rps
        print(f"serving throughput batching-on / batching-off at concurrency {args.concurrency}: "
              f"{ratio:.2f}x (goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'NOT met'}); "
              f"p99 latency on {results['batching on'].p99_ms:.1f} ms vs off "
              f"{results['batching off'].p99_ms:.1f} ms")


if __name__ == "__main__":
    main()
