"""Who may look, who may act: Basic auth or the app's own hook, CSRF tokens, headers.

- Basic auth is on when ``JOBRUNNER_WEB_USER`` and ``JOBRUNNER_WEB_PASSWORD`` are set
  (compared in constant time). An app that mounts the dashboard passes ``auth=``
  instead: a callable (sync or async) taking the Starlette ``Request`` and returning
  the user's name, or None to refuse (401); raising Starlette's (or FastAPI's)
  ``HTTPException`` refuses with its status, ``PermissionError`` with 403. The name is
  the actor in the audit.
- CSRF: a signed double-submit cookie. The cookie holds ``nonce.hmac(secret, nonce)``;
  every form carries the same value, and a POST is refused unless the field (or an
  ``X-CSRF-Token`` header) equals the cookie *and* the signature is the server's, so a
  cookie planted by a sibling subdomain does not pass either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: ``auth=``: the request in, the user's name out (None refuses).
AuthHook = Callable[[Request], "str | Awaitable[str | None] | None"]

CSRF_COOKIE = "jobrunner_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
ANONYMOUS = "anonymous"

#: Sent with every response: no framing, no sniffing, scripts and styles from here only.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


def basic_auth_from_env() -> AuthHook | None:
    """A Basic auth hook when ``JOBRUNNER_WEB_USER``/``JOBRUNNER_WEB_PASSWORD`` are set."""
    user = os.environ.get("JOBRUNNER_WEB_USER")
    password = os.environ.get("JOBRUNNER_WEB_PASSWORD")
    if not user or not password:
        return None
    return basic_auth(user, password)


def basic_auth(user: str, password: str) -> AuthHook:
    """A hook accepting exactly this user and password (constant-time comparison)."""
    expected_user = hashlib.sha256(user.encode()).digest()
    expected_password = hashlib.sha256(password.encode()).digest()

    def check(request: Request) -> str | None:
        given = _basic_credentials(request.headers.get("authorization", ""))
        if given is None:
            return None
        given_user, given_password = given
        user_ok = hmac.compare_digest(hashlib.sha256(given_user.encode()).digest(), expected_user)
        password_ok = hmac.compare_digest(
            hashlib.sha256(given_password.encode()).digest(), expected_password
        )
        return user if user_ok and password_ok else None

    check.basic = True  # type: ignore[attr-defined]
    return check


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class AuthMiddleware:
    """Refuses every request the hook refuses; stores the user for the audit."""

    def __init__(self, app: ASGIApp, hook: AuthHook | None) -> None:
        self.app = app
        self.hook = hook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = ANONYMOUS
        if self.hook is not None:
            try:
                found = self.hook(Request(scope, receive))
                if inspect.isawaitable(found):
                    found = await found
            except HTTPException as exc:  # the app's own refusal, as it says
                await _refused(exc.status_code, exc.detail, exc.headers)(scope, receive, send)
                return
            except PermissionError as exc:
                await _refused(403, str(exc) or "forbidden")(scope, receive, send)
                return
            if not found:
                await _refuse(self.hook)(scope, receive, send)
                return
            user = str(found)
        scope.setdefault("state", {})["jobrunner_user"] = user
        await self.app(scope, receive, _with_headers(send))


def _refused(
    status: int, detail: str, headers: Mapping[str, str] | None = None
) -> PlainTextResponse:
    return PlainTextResponse(f"{detail}\n", status, headers={**(headers or {}), **SECURITY_HEADERS})


def _refuse(hook: AuthHook) -> PlainTextResponse:
    headers = (
        {"www-authenticate": 'Basic realm="jobrunner"'} if getattr(hook, "basic", False) else {}
    )
    return PlainTextResponse(
        "authentication required\n", 401, headers={**headers, **SECURITY_HEADERS}
    )


def _with_headers(send: Send) -> Send:
    async def sending(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {name.lower() for name, _ in headers}
            for name, value in SECURITY_HEADERS.items():
                if name.encode() not in present:
                    headers.append((name.encode(), value.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return sending


def actor(request: Request) -> str:
    """The user the auth hook named, or ``anonymous``."""
    return str(getattr(request.state, "jobrunner_user", ANONYMOUS))


class Csrf:
    """Signed double-submit tokens with a per-app secret."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def new_token(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._sign(nonce)}"

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def valid_cookie(self, token: str | None) -> bool:
        if not token or token.count(".") != 1:
            return False
        nonce, signature = token.split(".")
        return hmac.compare_digest(signature, self._sign(nonce))

    def token_for(self, request: Request) -> str:
        """The request's valid cookie token, or a new one (set by the caller)."""
        cookie = request.cookies.get(CSRF_COOKIE)
        return cookie if cookie and self.valid_cookie(cookie) else self.new_token()

    def check(self, request: Request, submitted: str | None) -> bool:
        """True when the submitted token equals the cookie and the cookie is ours."""
        cookie = request.cookies.get(CSRF_COOKIE)
        given = submitted or request.headers.get(CSRF_HEADER)
        if not cookie or not given or not self.valid_cookie(cookie):
            return False
        return hmac.compare_digest(cookie.encode(), given.encode())
