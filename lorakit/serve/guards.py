"""ASGI middleware in front of every route: the Host check (against DNS rebinding), the API key, and the
request body's size and arrival time. Each answers in OpenAI's error shape before a route runs."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress

from fastapi.responses import JSONResponse

from lorakit.serve.protocol import APIError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ALL_ADDRESSES = frozenset({"0.0.0.0", "::"})


class TrustedHosts:
    """ASGI middleware against DNS rebinding (a web page whose domain is made to resolve to this
    server's address): the Host header must be localhost, a name in `allowed` (the --host address
    and --allowed_hosts; "*" allows any), or any IP address when the server listens on all of them.
    Other hosts get a 400."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app = app
        self.allowed = LOCAL_NAMES | {name.strip().lower().strip("[]").rstrip(".") for name in allowed}

    def accepts(self, name: str) -> bool:
        return "*" in self.allowed or name in self.allowed or (bool(self.allowed & ALL_ADDRESSES) and is_ip(name))

    async def __call__(self, scope, receive, send):
        host = dict(scope.get("headers", [])).get(b"host")
        name = None if host is None else host_name(host.decode("latin-1"))
        if scope["type"] != "http" or name is None or self.accepts(name):  # no Host: no browser sent it
            return await self.app(scope, receive, send)
        error = APIError(400, f"Host {name!r} is not a name of this server (a guard against DNS rebinding); "
                              f"to accept it, start the server with --allowed_hosts {name}", code="host_not_allowed")
        await JSONResponse(error.body(), status_code=400)(scope, receive, send)


def host_name(host: str) -> str:
    """The name in a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    host = host.strip().lower()
    return (host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]).rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class ApiKey:
    """ASGI middleware: with a key set, every route but /health needs the header
    `Authorization: Bearer <key>`; others get OpenAI's 401 (code invalid_api_key), before their
    body is read. The comparison takes the same time whatever the token (hmac.compare_digest of
    SHA-256 digests, so not even the key's length shows)."""

    OPEN = frozenset({"/health"})

    def __init__(self, app, key: str | None):
        self.app = app
        self.digest = None if key is None else hashlib.sha256(key.encode()).digest()

    def accepts(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").partition(b" ")
        given = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(given, self.digest) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if self.digest is None or scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization")
        if self.accepts(header):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided" if header else
                   "You didn't provide an API key: send it in the header Authorization: Bearer <key>")
        error = APIError(401, message, code="invalid_api_key")
        await JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets a 413 and is never held in memory; one
    that has not fully arrived timeout_s after the headers gets a 408, and the connection is closed."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout_s):
                read = await self._read(receive)
        except TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.timeout_s:g} s (--body_timeout_s)",
                             code="request_timeout")
            return await JSONResponse(error.body(), status_code=408, headers={"Connection": "close"})(
                scope, receive, send)
        if read is None:
            return  # the client went away
        chunks, size = read
        if size > self.max_bytes:  # read to the end (and dropped) so the client sees the answer
            error = APIError(413, f"the request body is {size} bytes; this server accepts at most "
                                  f"{self.max_bytes} (--max_body_bytes)", code="request_too_large")
            return await JSONResponse(error.body(), status_code=413)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> tuple[list[bytes], int] | None:
        """The body's chunks (none past max_bytes) and its size; None if the client went away."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return chunks, size
