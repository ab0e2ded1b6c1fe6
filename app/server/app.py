"""The FastAPI app: OpenAI's /v1/models and /v1/chat/completions (plain and streamed), and /health.

Every error a client can cause is answered in OpenAI's `{"error": {...}}` shape with a 4xx status; anything else
is a 500 with a short message, its traceback in the server log only. The event loop never runs torch or the
tokenizer: requests are checked and queued on the thread pool, and the engine's worker thread sends text back
through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from app import __version__
from app.core.chat import BASE
from app.core.errors import TailorError
from app.core.serving import Delta, Failed, Finished, Generation, ServeError, ServeRequest, ServingEngine
from app.server.auth import key_matches
from app.server.limits import MAX_BODY_BYTES, BodySizeLimit
from app.server.schemas import ChatCompletionRequest, chunk, completion, completion_id, error_body, usage

log = logging.getLogger("tailor.serve")

DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks whether its client is still there (to stop generating if not)."""


class _Relay:
    """Events from the engine's worker thread into an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the loop has closed: the server is gone and nobody waits for this reply


def create_app(engine: ServingEngine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="Tailor", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    # Endpoints find the engine through the request, never in their closures: FastAPI caches facts about endpoint
    # functions for the life of the process, and a closure would keep the engine, and with it the model, alive
    # after the server stops (the desktop app starts and stops servers in one process).
    app.state.engine = engine
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app)

    def require_key(request: Request) -> None:
        if api_key and not key_matches(request.headers.get("authorization"), api_key):
            raise HTTPException(401, "Missing or wrong API key. Send it as 'Authorization: Bearer KEY'.",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health(request: Request) -> dict:
        # Open without a key (for monitors), so it says nothing about the personas beyond how many there are.
        engine = request.app.state.engine
        return {"status": "ok", "version": __version__, "models": len(engine.model_names()),
                "queued": engine.queued, "running": engine.running, "largest_batch": engine.largest_batch,
                "mean_batch": round(engine.mean_batch, 2), **engine.counts}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        require_key(request)
        engine = request.app.state.engine
        personas = await run_in_threadpool(engine.personas)
        base_id = engine.session.resolved.model_id
        data = [{"id": BASE, "object": "model", "created": int(engine.started), "owned_by": "tailor", "root": base_id,
                 "parent": None}]
        data += [{"id": persona.name, "object": "model", "created": persona.created, "owned_by": "tailor",
                  "root": base_id, "parent": BASE} for persona in personas if persona.available]
        unavailable = [{"id": persona.name, "reason": persona.problem} for persona in personas if not persona.available]
        return {"object": "list", "data": data, "unavailable": unavailable}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        require_key(request)
        engine = request.app.state.engine
        parsed = _parse(await request.body())
        serve_request = await run_in_threadpool(_serve_request, engine, parsed)
        relay = _Relay(asyncio.get_running_loop())
        generation = await run_in_threadpool(engine.submit, serve_request, relay)
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(_stream(generation, relay, parsed.model, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, generation, relay, parsed.model)

    return app


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:  # thousands of nested [ or { : no chat request nests deeper than a few levels
        raise ServeError("The request body nests JSON arrays or objects too deeply.") from None
    if not isinstance(data, dict):
        raise ServeError("The request body must be a JSON object with 'model' and 'messages'.")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _serve_request(engine: ServingEngine, parsed: ChatCompletionRequest) -> ServeRequest:
    """The engine's request: the persona's own system prompt and sampling settings where the client gave none."""
    messages = [message.as_chat() for message in parsed.messages]
    if not any(message["role"] == "user" for message in messages):
        raise ServeError("'messages' has no user message; send at least one.", param="messages")
    given = {"temperature": parsed.temperature, "top_p": parsed.top_p, "max_new_tokens": parsed.max_new_tokens(),
             "seed": parsed.seed}
    settings = engine.settings_for(parsed.model, {key: value for key, value in given.items() if value is not None})
    if messages[0]["role"] != "system":
        system_prompt = engine.system_prompt(parsed.model)
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
    return ServeRequest(parsed.model, messages, settings, parsed.stop_strings())


async def _complete(request: Request, generation: Generation, relay: _Relay, model: str) -> JSONResponse:
    pieces, checked = [], time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(relay.queue.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # text may keep coming, so not only on a timeout
                checked = time.monotonic()
                if await request.is_disconnected():
                    log.info("Client went away; stopped request %d.", generation.id)
                    generation.cancel()
                    return JSONResponse(error_body("Client disconnected."), status_code=499)
            if isinstance(event, Delta):
                pieces.append(event.text)
            elif isinstance(event, Failed):
                raise ServeError(event.message, status=event.status)
            elif isinstance(event, Finished):
                return JSONResponse(completion(completion_id(), model, "".join(pieces), event.finish_reason,
                                               event.prompt_tokens, event.completion_tokens))
    finally:
        generation.cancel()  # a no-op once finished; stops generating for a request that failed or was abandoned


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(generation: Generation, relay: _Relay, model: str, include_usage: bool):
    id, created = completion_id(), int(time.time())
    try:
        yield _sse(chunk(id, model, created, {"role": "assistant", "content": ""}))
        while True:
            event = await relay.queue.get()
            if isinstance(event, Delta):
                yield _sse(chunk(id, model, created, {"content": event.text}))
            elif isinstance(event, Failed):
                # Headers are sent already, so the failure travels in the stream (the openai client raises it).
                yield _sse(error_body(event.message, type="server_error" if event.status >= 500 else "invalid_request_error"))
                break
            elif isinstance(event, Finished):
                yield _sse(chunk(id, model, created, {}, event.finish_reason))
                if include_usage:
                    yield _sse(chunk(id, model, created, {}, usage_counts=usage(event.prompt_tokens, event.completion_tokens)))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not generation.done:
            log.info("Client went away; stopped request %d.", generation.id)
        generation.cancel()


def _invalid(exc: ValidationError) -> ServeError:
    """The first problem pydantic found, in words, naming the field (OpenAI's `param`)."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return ServeError(f"Invalid '{param}': {message}." if param else f"Invalid request: {message}.", param=param or None)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        code = {404: "model_not_found"}.get(exc.status)
        return JSONResponse(error_body(exc.message, kind, exc.param, code), status_code=exc.status)

    @app.exception_handler(TailorError)
    async def tailor_error(request: Request, exc: TailorError) -> JSONResponse:
        log.info("%s %s -> 400: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"Invalid request: {exc.errors()[0].get('msg')}."), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
        code = {401: "invalid_api_key", 413: "request_too_large"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("Internal server error; the server log has the details.", "server_error"),
                            status_code=500)
