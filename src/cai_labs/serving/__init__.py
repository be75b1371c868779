"""Serving a causal LM over HTTP: continuous batching, a bounded queue, an LRU cache, an
OpenAI-compatible API.

One concept per module:

* :mod:`~cai_labs.serving.config` — :class:`ServeConfig`, the knobs.
* :mod:`~cai_labs.serving.engine` — :class:`GenerationEngine`: load a ``save_pretrained``
  checkpoint, one forward step, and a whole batch by one ``generate`` call (the reference).
* :mod:`~cai_labs.serving.sampling` — :class:`TokenSampler`, one request's token choice.
* :mod:`~cai_labs.serving.running_batch` — the running batch and its left-padded KV cache.
* :mod:`~cai_labs.serving.headroom_cache` — a KV cache that grows in place (spare columns, rows).
* :mod:`~cai_labs.serving.scheduler` — :class:`Scheduler`: iteration-level (continuous)
  batching, chunked prefill, a token budget; or static batching.
* :mod:`~cai_labs.serving.batcher` — :class:`Batcher`: bounded queue → scheduler steps.
* :mod:`~cai_labs.serving.service` — :class:`Service`: engine, batcher, cache, metrics and the
  one path of a request.
* :mod:`~cai_labs.serving.openai_api` — the OpenAI-compatible bodies.
* :mod:`~cai_labs.serving.tensor_parallel` — the scheduler on a 1D tensor-parallel OPT, every
  rank in step with rank 0.
* :mod:`~cai_labs.serving.cache` — :class:`LRUCache` of deterministic results.
* :mod:`~cai_labs.serving.metrics` — :class:`ServerMetrics` behind ``/metrics``.
* :mod:`~cai_labs.serving.schemas` — the JSON bodies (and so the OpenAPI docs).
* :mod:`~cai_labs.serving.app` — :func:`create_app`, the FastAPI routes.
* :mod:`~cai_labs.serving.runner` — run it in a thread or a child process on a free loopback port.
* :mod:`~cai_labs.serving.loadgen` — bounded loopback load generator (throughput, p50/p99).
* :mod:`~cai_labs.serving.toy_checkpoint` — a tiny OPT checkpoint made offline, for tests.

Start a server from a shell with ``python -m cai_labs.serving --checkpoint DIR --port 8000``.
"""

from cai_labs.serving.app import create_app
from cai_labs.serving.batcher import Batcher, QueueFull
from cai_labs.serving.cache import LRUCache
from cai_labs.serving.config import ServeConfig
from cai_labs.serving.engine import Completion, GenerationEngine, GenerationJob
from cai_labs.serving.loadgen import LoadResult, load_test, run_load
from cai_labs.serving.metrics import ServerMetrics
from cai_labs.serving.runner import ServerProcess, ServerThread
from cai_labs.serving.scheduler import Scheduler
from cai_labs.serving.service import Ask, Service, ServiceError
from cai_labs.serving.toy_checkpoint import make_toy_checkpoint

__all__ = [
    "ServeConfig",
    "GenerationEngine",
    "GenerationJob",
    "Completion",
    "Batcher",
    "Scheduler",
    "Service",
    "ServiceError",
    "Ask",
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
