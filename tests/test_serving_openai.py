"""The OpenAI-compatible API, driven by the official ``openai`` client against a server started
here; metrics (TTFT, TPOT, occupancy, Prometheus text); limits derived from the checkpoint; and
every error, on every endpoint, in the one documented ``{"error": ...}`` shape.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from cai_labs.serving import (
    GenerationEngine,
    ServeConfig,
    ServerThread,
    create_app,
    make_toy_checkpoint,
)

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    path = make_toy_checkpoint(tmp_path_factory.mktemp("chat"), chat_template=TEMPLATE)
    return GenerationEngine.from_pretrained(path, torch_threads=1)


@pytest.fixture(scope="module")
def server(chat_engine):
    config = ServeConfig(max_batch_size=4, max_wait_ms=5, model_name="toy-opt")
    with ServerThread(create_app(engine=chat_engine, config=config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)


def _generate(url: str, prompt: str, n: int) -> str:
    body = {"prompt": prompt, "max_new_tokens": n, "use_cache": False}
    return httpx.post(f"{url}/generate", json=body).json()["text"]


def test_models_completions_and_streaming(server, client):
    assert [m.id for m in client.models.list().data] == ["toy-opt"]
    out = client.completions.create(model="toy-opt", prompt="hello", max_tokens=6, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 6 and choice.text == _generate(server, "hello", 6)
    chunks = list(
        client.completions.create(
            model="toy-opt", prompt="hello", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    raw = httpx.post(
        f"{server}/v1/completions", json={"prompt": "hello", "max_tokens": 2, "stream": True}
    )
    assert raw.text.rstrip().endswith("data: [DONE]")
    # Seeded samples repeat; a stop string ends the text before it.
    sampled = [
        client.completions.create(
            model="toy-opt", prompt="Path", max_tokens=8, temperature=1.0, top_p=0.9, seed=3
        ).choices[0]
        for _ in range(2)
    ]
    assert sampled[0].text == sampled[1].text
    stop = choice.text[2:5]
    cut = client.completions.create(
        model="toy-opt", prompt="hello", max_tokens=6, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == choice.text[: choice.text.find(stop)]


def test_chat_uses_the_checkpoint_template(server, client, chat_engine):
    messages = [{"role": "user", "content": "Split the string"}]
    out = client.chat.completions.create(
        model="toy-opt", messages=messages, max_tokens=5, temperature=0
    )
    prompt = chat_engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _generate(server, prompt, 5)
    stream = client.chat.completions.create(
        model="toy-opt", messages=messages, max_tokens=5, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == out.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as info:  # the client keeps {"error": X} as .body X
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert "not served here" in info.value.body


def test_chat_without_a_template_is_a_clear_400(tmp_path):
    engine = GenerationEngine.from_pretrained(make_toy_checkpoint(tmp_path), torch_threads=1)
    with ServerThread(create_app(engine=engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": "hi"}],
            )
        assert info.value.status_code == 400 and "no chat template" in info.value.body


def test_metrics_report_ttft_tpot_occupancy_and_prometheus(server, client):
    httpx.post(f"{server}/metrics/reset")
    for prompt in ("hello", "Path objects", "Return a copy"):
        client.completions.create(model="toy-opt", prompt=prompt, max_tokens=5, temperature=0)
    m = httpx.get(f"{server}/metrics").json()
    assert m["ttft_ms"]["count"] == 3 and m["tpot_ms"]["count"] == 3
    assert 0 < m["ttft_ms"]["p50"] <= m["latency_ms"]["p99"]
    assert m["tokens_generated"] == 15 and m["tokens_per_s"] > 0
    assert m["decode_steps"] > 0 and m["mean_occupancy"] >= 1
    text = httpx.get(f"{server}/metrics/prometheus").text
    for name in ("serving_ttft_seconds_bucket", "serving_tpot_seconds_count",
                 "serving_batch_occupancy_bucket", "serving_queue_seconds_sum",
                 'serving_requests_total{outcome="ok"} 3.0'):  # fmt: skip
        assert name in text, name


def test_limits_come_from_the_checkpoint(chat_engine):
    derived = ServeConfig().for_checkpoint(chat_engine.max_positions, "m")
    assert chat_engine.max_positions == 256
    assert (derived.max_new_tokens_limit, derived.max_prompt_tokens) == (64, 192)
    own = ServeConfig(max_new_tokens_limit=10).for_checkpoint(256, "m")
    assert (own.max_new_tokens_limit, own.max_prompt_tokens) == (10, 246)


BAD = [
    ("/generate", b'{"prompt": "hi", "temperature": NaN}', 422, "finite"),
    ("/generate", b'{"prompt": "hi", "temperature": Infinity}', 422, "finite"),
    ("/generate", b'{"prompt": "hi", "top_p": 0}', 422, "top_p"),
    ("/generate", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("/generate/stream", b'{"prompt": "\xc3"}', 400, "UTF-8"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 422, "finite"),
    ("/v1/completions", b'{"prompt": "hi", "logprobs": 2}', 422, "logprobs"),
    ("/v1/completions", b'{"prompt": "hi", "n": 2}', 422, "n"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', 422, "one non-empty prompt"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 100000}', 422, "limit"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["a","b","c","d","e"]}', 422, "stop"),
    ("/v1/completions", b'{"prompt": "hi", "model": "other"}', 404, "not served"),
    ("/v1/completions", b"\x80not json", 400, "UTF-8"),
    ("/v1/chat/completions", b'{"messages": []}', 422, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 422, "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"', 400, "malformed JSON"),
    ("/no/such/path", b"{}", 404, "no such path"),
]


def test_every_error_has_the_documented_shape(server):
    for path, body, status, words in BAD:
        r = httpx.post(
            f"{server}{path}", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == status, (path, body, r.status_code, r.text)
        error = r.json()["error"]
        assert isinstance(error, str) and words in error, (path, body, error)
    r = httpx.get(f"{server}/generate")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]
    assert httpx.get(f"{server}/health").status_code == 200
