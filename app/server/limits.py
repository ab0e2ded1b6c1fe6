"""A cap on request body size, enforced while the body arrives (a client that lies about or omits Content-Length
is stopped as soon as it has sent too much), so a huge upload cannot fill the server's memory."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from app.server.schemas import error_body

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Far more than any chat that fits a small model's context; a bigger body is a mistake or an attack."""


class BodyTooLarge(HTTPException):
    """Raised from the body stream: an HTTPException, so the app's handler answers it (413) wherever it is read."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"The request body is larger than {max_bytes} bytes.")


class BodySizeLimit:
    """Pure ASGI middleware: answers 413 with an OpenAI-style error body for a request body over `max_bytes`."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"The request body is larger than {self.max_bytes} bytes.",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
