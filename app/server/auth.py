"""Client and admin authentication, decided on the raw ASGI path before any routing.

Deny by default: only the exact health paths are public, so no spelling of another path
(`//v1/...`, trailing slash, case, %-encoding, a forged Host) can reach a route unauthenticated.
`/admin/...` takes admin keys only (and does not exist without them); everything else takes
client keys. Keys are kept as SHA-256 digests and compared in constant time; client keys are
resolved by the client directory (app/tenants/directory.py), which also knows runtime keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable

import orjson
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import AuthenticationFailed, GatewayError, InvalidRequest
from app.tenants.directory import ClientDirectory

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
ADMIN_PREFIX = "/admin/"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ClientAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: tuple[SecretStr, ...],
        allow_anonymous: bool,
        admin_keys: tuple[SecretStr, ...] = (),
        public_paths: frozenset[str] = PUBLIC_PATHS,
        public_get: re.Pattern[str] | None = None,
        clients: Callable[[], ClientDirectory] | None = None,
    ) -> None:
        self.app = app
        # GETs whose whole raw path matches are public too (the hosted image files).
        self._public_get = public_get
        # Paths guarded by something else or by nothing (health; /metrics when public or when
        # it has its own token).
        self._public = public_paths
        # The directory lives in the lifespan's Gateway (it reads Redis), hence the accessor.
        self._clients = clients
        self._digests = _digests("client", keys)
        self._admin_digests = _digests("admin", admin_keys)
        self._allow_anonymous = allow_anonymous

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public or self._is_public_get(scope):
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        if scope["path"].startswith(ADMIN_PREFIX):
            await self._admin(scope, receive, send, presented)
            return
        directory = self._clients() if self._clients is not None else None
        client_id: str | None = None
        if presented is not None:
            client_id = (
                await directory.identify(presented)
                if directory is not None
                else _identify(self._digests, presented)
            )
        has_keys = directory.has_configured_keys if directory is not None else bool(self._digests)
        # Anonymous mode with no keys configured accepts whatever the SDK sends (it always sends
        # one); once keys exist, a wrong key is a mistake worth a 401 even in anonymous mode.
        anonymous_ok = self._allow_anonymous and (presented is None or not has_keys)
        if client_id is None and not anonymous_ok:
            await _reject(send, presented is None)
            return
        scope.setdefault("state", {})["client_id"] = client_id or "anonymous"
        await self.app(scope, receive, send)

    def _is_public_get(self, scope: Scope) -> bool:
        return (
            self._public_get is not None
            and scope["method"] == "GET"
            and self._public_get.fullmatch(scope["path"]) is not None
        )

    async def _admin(
        self, scope: Scope, receive: Receive, send: Send, presented: str | None
    ) -> None:
        if not self._admin_digests:
            await _send_error(send, 404, InvalidRequest("Unknown endpoint.", code="not_found"))
            return
        admin_id = _identify(self._admin_digests, presented) if presented is not None else None
        if admin_id is None:
            await _reject(send, presented is None)
            return
        scope.setdefault("state", {})["client_id"] = admin_id
        await self.app(scope, receive, send)


def _digests(kind: str, keys: tuple[SecretStr, ...]) -> list[tuple[str, bytes]]:
    return [
        (f"{kind}-{number}", _digest(key.get_secret_value()))
        for number, key in enumerate(keys, start=1)
    ]


def _identify(digests: list[tuple[str, bytes]], presented: str) -> str | None:
    digest = _digest(presented)
    found = None
    for key_id, expected in digests:
        # Compare against every key so timing does not tell which one matched.
        if hmac.compare_digest(digest, expected) and found is None:
            found = key_id
    return found


def _bearer(scope: Scope) -> str | None:
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


async def _reject(send: Send, missing: bool) -> None:
    message = (
        "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
        if missing
        else "Incorrect API key provided."
    )
    await _send_error(send, 401, AuthenticationFailed(message))


async def _send_error(send: Send, status: int, error: GatewayError) -> None:
    body = orjson.dumps(error.envelope())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
