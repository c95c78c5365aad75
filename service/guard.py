"""ASGI middleware in front of every endpoint: bearer-token auth, request content types, request-size limit, and
load shedding:
beyond max_inflight requests in flight, or while the model queue already holds more work than the latency budget
(`overloaded`, asked for the shed paths only), the service answers 503 with Retry-After at once, before reading
the body, instead of queueing without bound, so clients back off. POST bodies are read here, with an idle timeout,
before a request takes an in-flight slot (a stalled upload holds none). Bodies of routes given a validator are
checked before the app sees them (400 with the reason). Every refusal's JSON body has `error` (for people) and
`reason` (stable: draining, inflight, latency_budget, receiving, stalled, too_large, content_type, invalid)."""

from __future__ import annotations

import asyncio
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


class _BodyStalled(Exception):
    pass


class _Receiving(Exception):
    pass


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        token: str | None = None,
        max_request_bytes: int = 64 << 20,
        retry_after_s: int = 1,
        max_inflight: int | None = None,
        overloaded: Callable[[], tuple[str, int] | None] | None = None,
        shed_paths: frozenset[str] = frozenset(),
        validators: Mapping[str, Callable[[bytes], str | None]] | None = None,
        body_idle_timeout_s: float = 5.0,
        max_receiving_bytes: int | None = None,
        on_refusal: Callable[[str], None] | None = None,
        draining: Callable[[], bool] | None = None,
        register: Callable[[GuardMiddleware], None] | None = None,
    ):
        self.app = app
        self.max_inflight = max_inflight
        self.overloaded = overloaded  # None when there is room, else (why not, seconds to retry after)
        self.shed_paths = shed_paths
        # path -> check of a POST body before the app sees it (None: fine, else the 400's message): for routes
        # whose app would otherwise accept any body and fail later, such as a job submission.
        self.validators = dict(validators or {})
        self.inflight = 0  # one event loop per worker: plain ints are safe
        self.token = token.encode() if token else None
        self.max_request_bytes = max_request_bytes
        self.retry_after = str(retry_after_s).encode()
        # POST bodies are read here, before an in-flight slot is taken: a client that stops sending holds no slot,
        # and after body_idle_timeout_s without a byte its request ends with 408. Bodies being received hold at
        # most max_receiving_bytes (declared Content-Length, else bytes so far) between them.
        self.body_idle_timeout_s = body_idle_timeout_s
        self.max_receiving_bytes = max_receiving_bytes if max_receiving_bytes is not None else 8 * max_request_bytes
        self.receiving_bytes = 0
        self.on_refusal = on_refusal or (lambda reason: None)
        self.draining = draining or (lambda: False)  # True once the service stops admitting (SIGTERM)
        if register is not None:
            register(self)  # the app reads `inflight` while it drains

    def _authorised(self, scope: Scope) -> bool:
        if self.token is None or scope.get("path") in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token)
        return False

    async def _refuse(self, send: Send, status: int, reason: str, message: str, retry_after: int | None = None) -> None:
        self.on_refusal(reason)
        headers = [] if retry_after is None else [(b"retry-after", str(retry_after).encode())]
        await _send_json(send, status, {"error": message, "reason": reason}, headers)

    def _busy(self, scope: Scope) -> tuple[str, str, int] | None:
        """(reason, message, Retry-After seconds) when a POST is shed now, else None."""
        if self.draining():
            return "draining", "the service is shutting down; retry on another replica or after its restart", 5
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            retry = int(self.retry_after)
            return "inflight", f"overloaded: {self.inflight} requests in flight; retry later", retry
        if self.overloaded is not None and scope.get("path") in self.shed_paths:
            busy = self.overloaded()
            if busy is not None:
                return "latency_budget", busy[0], busy[1]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorised(scope):
            await _send_json(send, 401, {"error": "missing or wrong bearer token"}, [(b"www-authenticate", b"Bearer")])
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if content_type and content_type not in BODY_TYPES:
            allowed = " or ".join(sorted(kind.decode() for kind in BODY_TYPES))
            refused = content_type.decode(errors="replace")
            await self._refuse(send, 415, "content_type", f"content-type {refused!r} is not accepted: send {allowed}")
            return
        declared = headers.get(b"content-length")
        declared_bytes = int(declared) if declared is not None and declared.isdigit() else None
        if declared_bytes is not None and declared_bytes > self.max_request_bytes:
            await self._refuse(send, 413, "too_large", f"request body exceeds {self.max_request_bytes} bytes")
            return
        busy = self._busy(scope)  # before reading the body: a shed client spends nothing
        if busy is not None:
            await self._refuse(send, 503, *busy)
            return

        reserved = declared_bytes or 0
        if self.receiving_bytes + reserved > self.max_receiving_bytes:
            message = f"overloaded: {self.receiving_bytes} bytes of request bodies being received; retry later"
            await self._refuse(send, 503, "receiving", message, int(self.retry_after))
            return
        self.receiving_bytes += reserved
        try:
            body = await self._read_body(receive, reserved)
        except _BodyTooLarge:
            await self._refuse(send, 413, "too_large", f"request body exceeds {self.max_request_bytes} bytes")
            return
        except _BodyStalled:
            message = f"request body stalled: no bytes for {self.body_idle_timeout_s:g}s"
            await self._refuse(send, 408, "stalled", message)
            return
        except _Receiving:
            message = f"overloaded: {self.receiving_bytes} bytes of request bodies being received; retry later"
            await self._refuse(send, 503, "receiving", message, int(self.retry_after))
            return
        finally:
            self.receiving_bytes -= reserved
        if body is None:
            return  # the client went away
        validate = self.validators.get(scope.get("path", ""))
        problem = validate(body) if validate is not None else None
        if problem is not None:
            await self._refuse(send, 400, "invalid", problem)
            return
        busy = self._busy(scope)  # again: the body took time to arrive
        if busy is not None:
            await self._refuse(send, 503, *busy)
            return
        self.inflight += 1
        try:
            await self.app(scope, _replay(body, receive), self._with_retry_after(send))
        finally:
            self.inflight -= 1

    async def _read_body(self, receive: Receive, reserved: int) -> bytes | None:
        """The whole body, or None if the client disconnected. Raises _BodyStalled after body_idle_timeout_s
        without a message, _BodyTooLarge past max_request_bytes, _Receiving when an undeclared body would pass
        the receiving budget (its growth beyond `reserved` is counted as it arrives)."""
        chunks: list[bytes] = []
        received = extra = 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), self.body_idle_timeout_s)
                except asyncio.TimeoutError:
                    raise _BodyStalled from None
                if message["type"] != "http.request":
                    return None
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_request_bytes:
                    raise _BodyTooLarge
                grow = max(0, received - reserved) - extra
                if grow > 0:
                    if self.receiving_bytes + grow > self.max_receiving_bytes:
                        raise _Receiving
                    self.receiving_bytes += grow
                    extra += grow
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self.receiving_bytes -= extra

    def _with_retry_after(self, send: Send) -> Send:
        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (503, 429):
                if not any(name.lower() == b"retry-after" for name, _ in message.get("headers", [])):
                    message["headers"] = [*message.get("headers", []), (b"retry-after", self.retry_after)]
            await send(message)

        return send_with_retry_after


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then the client's later messages (disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
