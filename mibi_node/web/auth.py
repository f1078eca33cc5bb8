"""Who may see the status page and press its buttons.

With ``web.token`` set, every page and ``/api/`` route wants the token, given one of three
ways: an ``Authorization: Bearer <token>`` header (scripts), a ``?token=<token>`` query (a
bookmark: the page answers with a cookie and sends the browser on to the same address
without the token, so it stays out of the address bar and history), or the ``mibi_node_token``
cookie that the query or the sign-in form set (HttpOnly, SameSite=Strict). The cookie holds
an HMAC of the token, not the token itself. Tokens are compared in constant time.

Without a token the node listens on a loopback address only (the configuration refuses
anything else). Then it still answers only requests addressed to a loopback name (a page
elsewhere cannot reach it through DNS rebinding) and refuses POSTs that a page of another
origin sent (cross-site request forgery). ``/healthz``, ``/readyz`` and ``/metrics`` are
always open: they carry no patient data and monitoring needs them.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from starlette.requests import Request

__all__ = [
    "COOKIE_NAME",
    "PUBLIC_PATHS",
    "cookie_value",
    "is_loopback_name",
    "presented_token",
    "same_loopback_origin",
    "token_matches",
]

#: The cookie that carries the sign-in of a browser.
COOKIE_NAME = "mibi_node_token"
#: Routes open to anyone who can reach the port.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login"})


def cookie_value(token: str) -> str:
    """What the cookie holds for ``token``: an HMAC of it, so the token never sits there."""
    return hmac.new(token.encode(), b"mibi-node status page", hashlib.sha256).hexdigest()


def token_matches(expected: str, presented: str | None) -> bool:
    """Whether ``presented`` is the token (constant-time comparison)."""
    if not expected or presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def presented_token(request: Request, expected: str) -> str | None:
    """How ``request`` proves it knows the token: ``bearer``, ``cookie``, ``query`` or None."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and token_matches(expected, value.strip()):
        return "bearer"
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie is not None and hmac.compare_digest(cookie.encode(), cookie_value(expected).encode()):
        return "cookie"
    if token_matches(expected, request.query_params.get("token")):
        return "query"
    return None


def is_loopback_name(host: str) -> bool:
    """Whether a Host header (``name[:port]``) names this machine's loopback interface."""
    name = urlsplit(f"//{host}").hostname or ""
    return name in ("localhost", "::1") or name.startswith("127.")


def same_loopback_origin(request: Request) -> bool:
    """Whether a POST without a token came from a page of this node (or from no page at all).

    Browsers send ``Origin`` (or at least ``Referer``) with a form POST; scripts such as curl
    send neither and are let through: only a page of another site is refused.
    """
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return True
    return origin != "null" and is_loopback_name(urlsplit(origin).netloc)
