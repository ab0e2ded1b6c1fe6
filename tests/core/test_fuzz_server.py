"""Fuzzed HTTP requests against `tailor serve`'s app (a real 4-bit tiny Llama with a persona, in-process through
Starlette's TestClient): every answer is a success or a 4xx with an OpenAI-style JSON error, never a 5xx, and the
server keeps answering afterwards.
"""

from __future__ import annotations

import json

import pytest
from adapter_factory import make_random_adapters
from hypothesis import event, given
from hypothesis import strategies as st

from app.core.chat import ChatSession
from app.core.library import Library
from app.core.serving import ServingEngine
from app.server.app import create_app

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, json_values)


messages = st.lists(st.fixed_dictionaries({
    "role": maybe(st.sampled_from(["user", "user", "system", "assistant", "developer", "tool"])),
    "content": maybe(st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": maybe(st.just("text")),
                                                                           "text": maybe(st.text(max_size=10))}),
                                                    max_size=2)),
}), max_size=3)
requests = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from(["base", "pirate", "nobody", ""]))},
    optional={"messages": maybe(messages), "temperature": maybe(st.floats(0, 2)),
              "top_p": maybe(st.floats(0.01, 1)), "max_tokens": maybe(st.integers(1, 3)),
              "max_completion_tokens": maybe(st.integers(1, 3)), "stop": maybe(st.lists(st.text(max_size=3), max_size=5)),
              "seed": st.integers(-2**70, 2**70) | st.none(), "stream": maybe(st.booleans()),
              "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
              "n": maybe(st.integers(0, 2))},
)
valid_requests = st.fixed_dictionaries(
    {"model": st.sampled_from(["base", "pirate"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                 "content": st.text(max_size=30)}), max_size=2).map(
         lambda history: [*history, {"role": "user", "content": "Hi"}]),
     "max_tokens": st.integers(1, 3)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "stop": st.lists(st.text(max_size=3), max_size=4),
              "seed": st.integers(-2**70, 2**70), "stream": st.booleans(),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})},
)
bodies = st.one_of(
    valid_requests.map(lambda body: json.dumps(body).encode()),
    valid_requests.map(lambda body: json.dumps(body).encode()),
    requests.map(lambda body: json.dumps(body).encode()),
    requests.map(lambda body: json.dumps(body).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
    st.just(b'{"model": "base", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_base):
    from starlette.testclient import TestClient

    library = Library(tmp_path_factory.mktemp("serve-fuzz"))
    make_random_adapters(library, tiny_base, ["pirate"], system_prompt="You are a pirate.")
    engine = ServingEngine(ChatSession(str(tiny_base), "4bit"), library)
    engine.load_available()
    engine.start()
    with TestClient(create_app(engine), raise_server_exceptions=False) as test_client:
        yield test_client
    engine.close()


@given(body=bodies, path=st.sampled_from(["/v1/chat/completions"] * 4 + ["/v1/models", "/health", "/v1/nothing"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_fuzzed_requests_get_2xx_or_a_4xx_json_error(body, path, content_type, client):
    response = client.post(path, content=body, headers={"content-type": content_type})
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, (body[:300], response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
    elif path == "/v1/chat/completions" and "text/event-stream" in response.headers.get("content-type", ""):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    assert client.get("/health").status_code == 200
