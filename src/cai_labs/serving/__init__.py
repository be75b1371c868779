"""Serving a fine-tuned causal LM over HTTP: dynamic batching, a bounded queue, an LRU cache.

One concept per module:

* :mod:`~cai_labs.serving.config` — :class:`ServeConfig`, the knobs.
* :mod:`~cai_labs.serving.engine` — :class:`GenerationEngine`: load a ``save_pretrained``
  checkpoint, decode a left-padded batch with one ``generate`` call, per-request sampling.
* :mod:`~cai_labs.serving.batcher` — :class:`DynamicBatcher`: queue → batches (size / wait bound).
* :mod:`~cai_labs.serving.cache` — :class:`LRUCache` of deterministic results.
* :mod:`~cai_labs.serving.metrics` — :class:`ServerMetrics` behind ``/metrics``.
* :mod:`~cai_labs.serving.schemas` — the JSON bodies (and so the OpenAPI docs).
* :mod:`~cai_labs.serving.app` — :func:`create_app`, the FastAPI service.
* :mod:`~cai_labs.serving.runner` — run it in a thread or a child process on a free loopback port.
* :mod:`~cai_labs.serving.loadgen` — bounded loopback load generator (throughput, p50/p99).
* :mod:`~cai_labs.serving.toy_checkpoint` — a tiny OPT checkpoint made offline, for tests.

Start a server from a shell with ``python -m cai_labs.serving --checkpoint DIR --port 8000``.
"""

from cai_labs.serving.app import create_app
from cai_labs.serving.batcher import DynamicBatcher, QueueFull
from cai_labs.serving.cache import LRUCache
from cai_labs.serving.config import ServeConfig
from cai_labs.serving.engine import Completion, GenerationEngine, GenerationJob
from cai_labs.serving.loadgen import LoadResult, load_test, run_load
from cai_labs.serving.metrics import ServerMetrics
from cai_labs.serving.runner import ServerProcess, ServerThread
from cai_labs.serving.toy_checkpoint import make_toy_checkpoint

__all__ = [
    "ServeConfig",
    "GenerationEngine",
    "GenerationJob",
    "Completion",
    "DynamicBatcher",
    "QueueFull",
    "LRUCache",
    "ServerMetrics",
    "create_app",
    "ServerThread",
    "ServerProcess",
    "LoadResult",
    "load_test",
    "run_load",
    "make_toy_checkpoint",
]
