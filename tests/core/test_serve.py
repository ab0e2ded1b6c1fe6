"""`tailor serve` end to end: a real uvicorn server on 127.0.0.1 (a free port), driven by the official `openai`
client and raw httpx, over a real 4-bit tiny Llama with two persona adapters. Every reply must equal what the chat
engine gives for that persona with the same greedy settings; every bad input gets its status and an OpenAI-style
error body, and the server keeps answering afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from adapter_factory import make_random_adapters

from app.cli import main
from app.core.chat import BASE, ChatSession, GenerationSettings
from app.core.library import Library
from app.core.serving import Delta, Failed, Finished, ServeRequest, ServingEngine
from app.server.app import create_app
from app.server.limits import MAX_BODY_BYTES
from app.server.runner import ServerThread, bind

KEY = "s3cret-key"
HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def make_persona(library: Library, base, name: str, system_prompt: str, seed: int) -> None:
    """A random persona on every linear layer, its B matrices scaled up: strong enough that the tiny model's greedy
    replies differ visibly from persona to persona (a reply of only newlines would prove nothing)."""
    from safetensors.torch import load_file, save_file

    entry = make_random_adapters(library, base, [name], rank=8, system_prompt=system_prompt, seed=seed,
                                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))[0]
    weights = entry.path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({key: tensor * (10 if "lora_B" in key else 1) for key, tensor in tensors.items()}, weights)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base) -> Library:
    library = Library(tmp_path_factory.mktemp("serve-library"))
    make_persona(library, tiny_base, "alpha", "You are calm.", seed=1)
    make_persona(library, tiny_base, "beta", "You are loud.", seed=2)
    return library


@pytest.fixture(scope="module")
def engine(library, tiny_base):
    engine = ServingEngine(ChatSession(str(tiny_base), "4bit"), library)
    engine.load_available()
    yield engine.start()
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    server = ServerThread(create_app(engine), bind("127.0.0.1", 0)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def expected(engine: ServingEngine, model: str, messages: list[dict], max_tokens: int, **settings) -> str:
    """What the chat engine (`tailor chat`) answers, with the persona's system prompt as the server applies it."""
    session = engine.session
    system_prompt = session.system_prompt(model) if messages[0]["role"] != "system" else None
    return session.reply(session.prompt_messages(messages, system_prompt), model,
                         GenerationSettings(max_new_tokens=max_tokens, **{"temperature": 0, **settings}))


def ask(client, model: str, messages=HELLO, max_tokens: int = 16, **options):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                          **options)


def test_models_lists_base_and_personas_with_base_as_parent(client, server, library, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
    make_random_adapters(library, other, ["misfit"])
    try:
        models = {model.id: model for model in client.models.list()}
        assert set(models) == {BASE, "alpha", "beta"}
        assert models["alpha"].parent == BASE and models["beta"].parent == BASE
        listing = httpx.get(server.url + "/v1/models").json()
        assert listing["unavailable"] == [{"id": "misfit", "reason": pytest.approx(listing["unavailable"][0]["reason"])}]
        assert "trained for other-base" in listing["unavailable"][0]["reason"]
        with pytest.raises(openai.NotFoundError, match="cannot be served.*trained for other-base"):
            ask(client, "misfit")
    finally:
        library.delete("misfit")


def test_non_streaming_reply_equals_the_chat_engine_with_usage(client, engine):
    for model in ("alpha", "beta", BASE):
        reply = ask(client, model, max_tokens=12)
        assert reply.object == "chat.completion" and reply.model == model
        assert reply.choices[0].message.content.strip() == expected(engine, model, HELLO, 12)
        assert model == BASE or len(reply.choices[0].message.content.strip()) > 10
        prompt = engine.prompt_ids(engine.session.prompt_messages(HELLO, engine.session.system_prompt(model)))
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.usage.completion_tokens <= 12
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")
    assert ask(client, "alpha").choices[0].message.content != ask(client, "beta").choices[0].message.content


def test_streaming_sends_chunks_then_done_and_equals_the_plain_reply(client, server, engine):
    stream = ask(client, "beta", max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.strip() == expected(engine, "beta", HELLO, 12)
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1

    body = {"model": "beta", "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_two_personas_answer_concurrently_each_with_its_own_reply(server, client, engine):
    prompts = ["Tell me about the sea.", "Tell me about the sky.", "Tell me about the moon."]
    jobs = [(model, [{"role": "user", "content": prompt}]) for prompt in prompts for model in ("alpha", "beta")]
    # Equal prompt lengths, so no row is padded: a padded row's attention rounds differently in bf16 (by ~4e-3 in
    # the logits), which can flip a near-tie of the random tiny model; the batch itself changes nothing.
    session = engine.session
    assert len({len(engine.prompt_ids(session.prompt_messages(messages, session.system_prompt(model))))
                for model, messages in jobs}) == 1
    replies: dict[int, str] = {}

    def run(index: int, model: str, messages: list[dict]) -> None:
        replies[index] = ask(client, model, messages, max_tokens=10).choices[0].message.content.strip()

    engine.largest_batch = engine.decode_steps = engine.decoded_rows = 0
    threads = [threading.Thread(target=run, args=(index, *job)) for index, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert engine.largest_batch >= 2, "requests waiting together are answered in one mixed-persona batch"
    health = httpx.get(server.url + "/health").json()
    assert health["largest_batch"] == engine.largest_batch and 1 < health["mean_batch"] <= engine.largest_batch
    for index, (model, messages) in enumerate(jobs):
        assert replies[index] == expected(engine, model, messages, 10), f"request {index} ({model})"
    assert replies[0] != replies[1], "two personas, two different replies"


class Reply:
    """A listener for ServingEngine.submit: collects a reply's events and says when it has ended."""

    def __init__(self):
        self.events: list = []
        self.ended = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.ended.set()

    @property
    def text(self) -> str:
        assert self.ended.wait(120), "the reply never ended"
        return "".join(event.text for event in self.events if isinstance(event, Delta)).strip()


def submit(engine: ServingEngine, model: str, messages: list[dict], **settings):
    """Queue a request as the server does (the persona's system prompt first); returns (generation, reply)."""
    session = engine.session
    reply = Reply()
    request = ServeRequest(model, session.prompt_messages(messages, session.system_prompt(model)),
                           GenerationSettings(**{"temperature": 0, **settings}), ("\u2603never",))
    return engine.submit(request, reply), reply


def test_a_request_arriving_mid_generation_joins_the_running_batch_and_gets_its_own_reply(engine):
    sky = [{"role": "user", "content": "Tell me a long story about the sky, the birds and the wind, please."}]
    steps: list[set[int]] = []
    late = []

    def watch(generations) -> None:
        steps.append({generation.id for generation in generations})
        if len(steps) == 3:  # the first request is three tokens into its reply
            late.append(submit(engine, "beta", sky, max_new_tokens=12))

    joined = engine.counts["joined_running"]
    engine.on_step = watch
    try:
        first, first_reply = submit(engine, "alpha", HELLO, max_new_tokens=24)
        first_text = first_reply.text
        (second, second_reply), = late
        second_text = second_reply.text
    finally:
        engine.on_step = None
    assert second.joined_running and engine.counts["joined_running"] == joined + 1
    together = [step for step in steps if second.id in step]
    assert together and all(first.id in step for step in together[:1]), "it decoded beside the running request"
    assert steps[:3] == [{first.id}] * 3
    assert first.finish_reason in ("length", "stop") and len(first.tokens) > 4, "the first was still mid-reply"
    # Different prompt lengths: the rows are padded to a common width; each must still answer as it does alone.
    assert len(engine.prompt_ids(sky)) != len(engine.prompt_ids(HELLO))
    assert first_text == expected(engine, "alpha", HELLO, 24)
    assert second_text == expected(engine, "beta", sky, 12)


def test_a_finished_or_cancelled_request_leaves_the_batch_before_the_next_step(engine):
    steps: list[set[int]] = []

    def watch(generations) -> None:
        steps.append({generation.id for generation in generations})
        for generation in generations:
            if generation.request.model == "alpha" and sum(generation.id in step for step in steps) == 4:
                generation.cancel()  # as the server does when its client goes away; here during its 4th step

    cancelled = engine.counts["cancelled"]
    engine.on_step = watch
    try:
        long, long_reply = submit(engine, "alpha", HELLO, max_new_tokens=40)
        short, short_reply = submit(engine, BASE, HELLO, max_new_tokens=3)
        sampled, sampled_reply = submit(engine, "beta", HELLO, max_new_tokens=14, temperature=0.9, seed=11)
        sampled_text = sampled_reply.text
        assert long_reply.ended.wait(60) and short_reply.ended.wait(60)
    finally:
        engine.on_step = None
    assert long.finish_reason == "cancelled" and engine.counts["cancelled"] == cancelled + 1
    assert long_reply.events[-1] == Finished("cancelled", len(long.prompt_ids), len(long.tokens))
    assert sum(long.id in step for step in steps) == 4, "no step after the cancel computed the cancelled request"
    # The first token comes from the prompt's prefill, every other from one step; none after the last.
    sampled_tokens = len(short.tokens) + (short.finish_reason == "stop")  # an end-of-turn token is not in `tokens`
    assert sum(short.id in step for step in steps) == sampled_tokens - 1
    assert sampled.finish_reason in ("length", "stop") and len(sampled.tokens) > 4
    assert any(step == {sampled.id} for step in steps), "the others left, it went on alone"
    # A seeded, sampled request sharing the batch with greedy ones draws what it draws alone in `tailor chat`.
    assert sampled_text == expected(engine, "beta", HELLO, 14, temperature=0.9, seed=11)


def test_persona_system_prompt_applies_only_when_the_request_has_none(client, engine):
    own = [{"role": "system", "content": "You are a pirate."}, *HELLO]
    assert ask(client, "alpha", own, 12).choices[0].message.content.strip() == expected(engine, "alpha", own, 12)
    with_default = ask(client, "alpha", HELLO, 12).choices[0].message.content.strip()
    assert with_default == expected(engine, "alpha", HELLO, 12)
    session = engine.session
    bare = session.reply(session.prompt_messages(HELLO, None), "alpha", GenerationSettings(max_new_tokens=12))
    assert with_default != bare, "the stored prompt must change the reply, or this test proves nothing"


def test_a_persona_s_recommended_sampling_applies_when_the_request_sets_none(client, engine, library, tiny_base):
    from app.core.library import MANIFEST_NAME, write_json_atomic

    make_persona(library, tiny_base, "steady", "You are calm.", seed=4)
    entry = library.get("steady")
    write_json_atomic(entry.path / MANIFEST_NAME, {**entry.manifest, "sampling": {"temperature": 0}})
    try:
        replies = {client.chat.completions.create(model="steady", messages=HELLO, max_tokens=10).choices[0].message.content
                   for _ in range(3)}
        assert len(replies) == 1, "the recommended temperature 0 makes the reply greedy, hence repeatable"
        assert replies.pop().strip() == expected(engine, "steady", HELLO, 10)
    finally:
        library.delete("steady")


def test_stop_strings_cut_the_reply_and_a_seed_repeats_a_sampled_one(client, engine):
    full = ask(client, "beta", max_tokens=16).choices[0].message.content
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    stopped = ask(client, "beta", max_tokens=16, stop=[stop])
    assert stopped.choices[0].message.content == full[:full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    sampled = [client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=10, temperature=0.9, top_p=0.9,
                                              seed=5).choices[0].message.content.strip() for _ in range(2)]
    assert sampled[0] == sampled[1] == expected(engine, "alpha", HELLO, 10, temperature=0.9, top_p=0.9, seed=5)


def test_a_persona_added_while_serving_is_available_without_restart(client, engine, library, tiny_base):
    make_persona(library, tiny_base, "gamma", "You are new.", seed=3)
    try:
        assert "gamma" in {model.id for model in client.models.list()}
        reply = ask(client, "gamma", max_tokens=8).choices[0].message.content.strip()
        assert reply == expected(engine, "gamma", HELLO, 8)
    finally:
        library.delete("gamma")
    assert "gamma" not in {model.id for model in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        ask(client, "gamma")


def post(server, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json"})


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "alpha", "messages": [', 400, "not valid JSON"),
    "not an object": (b'["alpha"]', 400, "JSON object"),
    "temperature as text": ({"model": "alpha", "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    "max_tokens as text": ({"model": "alpha", "messages": HELLO, "max_tokens": "5"}, 400, "max_tokens"),
    "messages not a list": ({"model": "alpha", "messages": "hello"}, 400, "messages"),
    "content a number": ({"model": "alpha", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    "empty messages": ({"model": "alpha", "messages": []}, 400, "messages"),
    "unknown role": ({"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'"),
    "no user message": ({"model": "alpha", "messages": [{"role": "system", "content": "hi"}]}, 400, "no user message"),
    "negative max_tokens": ({"model": "alpha", "messages": HELLO, "max_tokens": -3}, 400, "max_tokens"),
    "top_p above 1": ({"model": "alpha", "messages": HELLO, "top_p": 1.5}, 400, "top_p"),
    "missing model": ({"messages": HELLO}, 400, "model"),
    "unknown model": ({"model": "nobody", "messages": HELLO}, 404, "Available models: base, alpha, beta"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(case, server, client):
    body, status, words = BAD_REQUESTS[case]
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert ask(client, "alpha", max_tokens=2).choices[0].message.content is not None


def raw_post(server, headers: bytes, body_parts=()) -> tuple[int, dict]:
    """A request written on a bare socket, so the test controls how much of the body is ever sent: a client that
    keeps writing after the server has answered and closed gets its answer reset (TCP RST) instead of read."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=60) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: tailor\r\n"
                           b"Content-Type: application/json\r\n" + headers + b"\r\n")
        for part in body_parts:
            connection.sendall(part)
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += connection.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body)


def test_an_oversized_body_gets_413_without_being_read_whole(server, client):
    # A declared size over the limit is refused from the headers alone: none of the body is ever sent.
    status, error = raw_post(server, b"Content-Length: %d\r\n" % (MAX_BODY_BYTES + 10))
    assert status == 413 and "larger than" in error["error"]["message"]

    # No Content-Length: the limit must hold while the body streams in. Exactly enough is sent to cross it (and no
    # end of body), so the server answers once it has read one chunk too many, not the whole body.
    chunk = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_BODY_BYTES // len(chunk) + 1)
    status, error = raw_post(server, b"Transfer-Encoding: chunked\r\n", chunks)
    assert status == 413 and error["error"]["code"] == "request_too_large"
    assert ask(client, "alpha", max_tokens=2).choices[0].message.content is not None


def test_max_tokens_beyond_the_context_is_clamped_and_long_conversations_trimmed(client, server, engine):
    context = engine.context_tokens
    generation = engine.submit(ServeRequest("alpha", HELLO, GenerationSettings(max_new_tokens=context * 10)), print)
    generation.cancel()
    assert generation.max_new_tokens == context - len(generation.prompt_ids)
    body = {"model": "alpha", "messages": HELLO, "max_tokens": context * 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and next(response.iter_lines()).startswith("data: ")

    turn = "Tell me a long story about the sea and the ships. " * 8
    conversation = [{"role": "system", "content": "You are terse."}]
    for index in range(60):
        conversation += [{"role": "user", "content": f"{index}: {turn}"}, {"role": "assistant", "content": turn}]
    conversation.append({"role": "user", "content": "And now?"})
    assert len(engine.prompt_ids(conversation)) > context, "the conversation must overflow, or this proves nothing"
    reply = ask(client, "alpha", conversation, max_tokens=8)
    assert reply.usage.prompt_tokens + 8 <= context
    trimmed = engine.trim(conversation, 8)
    assert trimmed[0] == conversation[0] and trimmed[-1] == conversation[-1] and trimmed[1]["role"] == "user"
    assert reply.choices[0].message.content.strip() == expected(engine, "alpha", trimmed, 8)


def test_an_engine_failure_is_a_500_without_traceback_and_the_server_recovers(client, engine, server, monkeypatch):
    def broken(*args, **options):
        raise RuntimeError("simulated failure deep inside the model's forward pass")

    monkeypatch.setattr(engine.session.model, "forward", broken)
    response = post(server, {"model": "alpha", "messages": HELLO, "max_tokens": 4})
    assert response.status_code == 500
    assert "simulated" not in response.text and "Traceback" not in response.text
    assert response.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert ask(client, "alpha", max_tokens=2).choices[0].message.content is not None


def test_a_client_that_goes_away_stops_its_generation(server, engine):
    body = {"model": "alpha", "messages": HELLO, "max_tokens": 900, "temperature": 0, "stream": True,
            "stop": ["\u2603never"]}  # keeps the tiny model from ending early by itself
    cancelled = engine.counts["cancelled"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())
    started = time.monotonic()
    while engine.counts["cancelled"] == cancelled and time.monotonic() - started < 20:
        time.sleep(0.05)
    assert engine.counts["cancelled"] == cancelled + 1, "the streamed request was not stopped"

    with pytest.raises(httpx.ReadTimeout):
        post(server, {**body, "stream": False}, timeout=1.0)
    while engine.counts["cancelled"] == cancelled + 1 and time.monotonic() - started < 40:
        time.sleep(0.05)
    assert engine.counts["cancelled"] == cancelled + 2, "the plain request was not stopped"
    assert engine.running == 0 or engine.queued == 0


def test_with_an_api_key_requests_without_it_get_401(engine):
    server = ServerThread(create_app(engine, api_key=KEY), bind("127.0.0.1", 0)).start()
    try:
        for key in ("wrong", KEY + "x", KEY[:-1]):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).models.list()
        for header in ({}, {"Authorization": KEY}, {"Authorization": "Bearer ".encode() + "ünïcode".encode()}):
            assert httpx.get(server.url + "/v1/models", headers=header).status_code == 401
        response = httpx.post(server.url + "/v1/chat/completions", json={"model": "alpha", "messages": HELLO})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert ask(good, "alpha", max_tokens=2).choices[0].message.content is not None
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()


def test_cli_refuses_a_public_address_without_a_key_before_loading_anything(library, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("app.core.chat.ChatSession.__init__", no_loading)
    started = time.monotonic()
    assert main(["--library", str(library.root), "serve", "--host", "0.0.0.0"]) == 2
    assert time.monotonic() - started < 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["--library", str(library.root), "serve", "--adapters", "alpha,nobody"]) == 2
    assert "No adapter named 'nobody'" in capsys.readouterr().err
    assert main(["--library", str(library.root), "serve", "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err


def test_tailor_serve_command_serves_until_stopped(library, tiny_base):
    with bind("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "--library", str(library.root), "serve", "--port",
                               str(port), "--base", str(tiny_base), "--quant", "4bit"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | {"COLUMNS": "200"})
    try:
        banner = []
        for line in server.stdout:
            banner.append(line)
            if line.startswith("Try: "):
                break
        text = "".join(banner)
        assert f"OpenAI-compatible API at http://127.0.0.1:{port}/v1" in text and "alpha, beta" in text
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in banner[-1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=2, timeout=60)
        reply = ask(client, "alpha", max_tokens=3)
        assert reply.usage.completion_tokens >= 1
    finally:
        server.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says what ended it.
        assert server.wait(30) in (0, -signal.SIGTERM)
