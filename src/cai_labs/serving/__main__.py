"""Start the service: ``python -m cai_labs.serving --checkpoint DIR --port 8000``.

Listens on 127.0.0.1 unless ``--host`` says otherwise; ``--port 0`` picks a free port and prints
it (``listening on http://127.0.0.1:PORT``). Batching policy, queue, cache sizes and limits are
options; see ``--help``. OpenAPI docs are then at ``http://127.0.0.1:PORT/docs``; OpenAI clients
use ``http://127.0.0.1:PORT/v1`` as their base URL.
"""

from __future__ import annotations

import argparse
import socket
import sys

from cai_labs.serving.config import POLICIES, ServeConfig

DEFAULTS = ServeConfig()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cai_labs.serving",
        description="Serve a save_pretrained causal LM over HTTP.",
    )
    p.add_argument("--checkpoint", required=True, help="save_pretrained directory to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULTS.max_batch_size,
        help="1 turns dynamic batching off",
    )
    p.add_argument("--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms)
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default=DEFAULTS.policy,
        help="continuous: requests join and leave at every step; static: whole batches; "
        "padded: whole batches, finished rows still computed (one generate call per batch)",
    )
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULTS.max_batch_tokens)
    p.add_argument("--prefill-chunk", type=int, default=DEFAULTS.prefill_chunk)
    p.add_argument("--model-name", default=None, help="id for /v1/models (default: dir name)")
    p.add_argument("--queue-size", type=int, default=DEFAULTS.queue_size)
    p.add_argument("--cache-size", type=int, default=DEFAULTS.cache_size, help="0 = no cache")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="default: the checkpoint's positions minus --max-new-tokens",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="largest max_new_tokens a request may ask for (default: a quarter of the "
        "checkpoint's positions)",
    )
    p.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout_s)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model")
    p.add_argument(
        "--keep-alive",
        type=float,
        default=DEFAULTS.keep_alive_s,
        help="seconds an idle connection stays open (longer than clients' pool expiry)",
    )
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from cai_labs.serving.app import create_app
    from cai_labs.serving.runner import uvicorn_config

    args = parse_args(argv)
    try:
        config = ServeConfig(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            policy=args.policy,
            max_batch_tokens=args.max_batch_tokens,
            prefill_chunk=args.prefill_chunk,
            model_name=args.model_name,
            queue_size=args.queue_size,
            cache_size=args.cache_size,
            max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens_limit=args.max_new_tokens,
            request_timeout_s=args.request_timeout,
            torch_threads=args.threads,
            keep_alive_s=args.keep_alive,
        )
        app = create_app(args.checkpoint, config)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"cai_labs.serving: listening on http://{host}:{port} (docs at /docs)", flush=True)
    server = uvicorn.Server(uvicorn_config(app, log_level=args.log_level))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
