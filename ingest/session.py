"""Browser sessions for the deployment API: a signed cookie instead of the bearer token.

A browser cannot send `Authorization: Bearer ...` from a plain link, form or EventSource, so the
console's login form checks the token once and sets a cookie the API accepts in its place.

Invariants:
- the cookie holds no secret and no server-side state: `<expires>.<hmac-sha256(token, expires)>`,
  so any API process with the same `MODELCD_API_TOKEN` accepts it, and changing the token
  invalidates every session at once;
- every comparison is constant-time (`hmac.compare_digest`), of digests of equal length, so
  neither the token nor a valid MAC leaks through timing, not even the token's length;
- the cookie is HttpOnly (scripts cannot read it) and SameSite=Strict (no other site can make a
  browser send it, so a form elsewhere cannot post to the API with it: no CSRF).
"""

from __future__ import annotations

import hashlib
import hmac

COOKIE = "modelcd_session"
TTL_S = 12 * 3600.0
_CONTEXT = b"modelcd-console-session:"


def _mac(token: str, expires: int) -> str:
    return hmac.new(token.encode(), _CONTEXT + str(expires).encode(), hashlib.sha256).hexdigest()


def token_matches(given: str | bytes, token: str) -> bool:
    """Constant-time comparison of a token someone typed with the configured one."""
    raw = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(hashlib.sha256(raw).digest(), hashlib.sha256(token.encode()).digest())


def issue(token: str, now: float, ttl: float = TTL_S) -> str:
    """A session value valid until `now + ttl`."""
    expires = int(now + ttl)
    return f"{expires}.{_mac(token, expires)}"


def valid(token: str, value: str, now: float) -> bool:
    """Whether `value` was issued with `token` and has not expired."""
    expires_text, sep, mac = value.partition(".")
    if not sep or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    return hmac.compare_digest(mac.encode(), _mac(token, expires).encode()) and expires > now


def from_cookie_header(header: bytes | None) -> str | None:
    """The session value from a `Cookie:` header, if there is one."""
    if not header:
        return None
    for item in header.decode("latin-1").split(";"):
        name, sep, value = item.strip().partition("=")
        if sep and name == COOKIE:
            return value.strip().strip('"')
    return None


def set_cookie(value: str, *, secure: bool, max_age: float = TTL_S) -> bytes:
    """The `Set-Cookie` header value for a session (Path=/: the console's buttons post to /endpoints)."""
    attrs = f"{COOKIE}={value}; Path=/; Max-Age={int(max_age)}; HttpOnly; SameSite=Strict"
    return (attrs + ("; Secure" if secure else "")).encode()


def clear_cookie() -> bytes:
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict".encode()
