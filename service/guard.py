"""ASGI middleware in front of every endpoint: bearer-token auth, request content types, request-size limit, and
load shedding:
beyond max_inflight requests in flight, or while the model queue already holds more work than the latency budget
(`overloaded`, asked for the shed paths only), the service answers 503 with Retry-After at once, before reading
the body, instead of queueing without bound, so clients back off. Bodies of routes given a validator are checked
before the app sees them (400 with the reason)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Probes stay open so orchestrators can check health without holding the token.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
# Request bodies are JSON, or a multipart form for /score/upload. BentoML would also accept its pickle content
# type; refusing every other type up front keeps request data away from any unpickling path.
BODY_TYPES = frozenset({b"application/json", b"multipart/form-data"})


class _BodyTooLarge(Exception):
    pass


async def _send_json(send: Send, status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        token: str | None = None,
        max_request_bytes: int = 64 << 20,
        retry_after_s: int = 1,
        max_inflight: int | None = None,
        overloaded: Callable[[], str | None] | None = None,
        shed_paths: frozenset[str] = frozenset(),
        validators: Mapping[str, Callable[[bytes], str | None]] | None = None,
    ):
        self.app = app
        self.max_inflight = max_inflight
        self.overloaded = overloaded  # None when there is room, else why not
        self.shed_paths = shed_paths
        # path -> check of a POST body before the app sees it (None: fine, else the 400's message): for routes
        # whose app would otherwise accept any body and fail later, such as a job submission.
        self.validators = dict(validators or {})
        self.inflight = 0  # one event loop per worker: a plain int is safe
        self.token = token.encode() if token else None
        self.max_request_bytes = max_request_bytes
        self.retry_after = str(retry_after_s).encode()

    def _authorised(self, scope: Scope) -> bool:
        if self.token is None or scope.get("path") in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorised(scope):
            await _send_json(send, 401, {"error": "missing or wrong bearer token"}, [(b"www-authenticate", b"Bearer")])
            return
        headers = dict(scope.get("headers", []))
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if scope.get("method") == "POST" and content_type and content_type not in BODY_TYPES:
            allowed = " or ".join(sorted(kind.decode() for kind in BODY_TYPES))
            refused = content_type.decode(errors="replace")
            await _send_json(send, 415, {"error": f"content-type {refused!r} is not accepted: send {allowed}"})
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            await _send_json(send, 413, {"error": f"request body exceeds {self.max_request_bytes} bytes"})
            return

        shed = scope.get("method") == "POST" and self.max_inflight is not None
        if shed and self.inflight >= self.max_inflight:
            await _send_json(
                send,
                503,
                {"error": f"overloaded: {self.inflight} requests in flight; retry later"},
                [(b"retry-after", self.retry_after)],
            )
            return
        busy = self.overloaded() if shed and self.overloaded and scope.get("path") in self.shed_paths else None
        if busy is not None:
            await _send_json(send, 503, {"error": busy}, [(b"retry-after", self.retry_after)])
            return
        if shed:
            self.inflight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            if shed:
                self.inflight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise _BodyTooLarge
            return message

        async def send_with_retry_after(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in (503, 429):
                    message["headers"] = [*message.get("headers", []), (b"retry-after", self.retry_after)]
            await send(message)

        try:
            validate = self.validators.get(scope.get("path", "")) if scope.get("method") == "POST" else None
            if validate is None:
                await self.app(scope, counted_receive, send_with_retry_after)
                return
            # Read the whole body (size-limited as above), check it, then hand the same bytes on.
            chunks, more = [], True
            while more:
                message = await counted_receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = b"".join(chunks)
            problem = validate(body)
            if problem is not None:
                await _send_json(send, 400, {"error": problem})
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_with_retry_after)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"error": f"request body exceeds {self.max_request_bytes} bytes"})
