"""Console sign-in state (pure: no Ray, no HTTP framework).

The session lives in the cookie itself, sealed (encrypted and authenticated) with Fernet
under a key derived from the console secret, so any Gateway replica can read it and no
server-side store is needed. It carries the key the operator signed in with, because every
page is built from the admin API called with that key: disabling or rotating the key ends
the session on its next page. The cookie is HttpOnly and SameSite=Strict; a page never
contains the key.

CSRF: every form carries a token bound to the session (HMAC of its nonce); the sign-in
form, which has no session yet, uses a double-submit token bound to a pre-session cookie.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Role = Literal["admin", "approver"]
SESSION_COOKIE = "llmstack_console"
LOGIN_COOKIE = "llmstack_console_login"
MAX_COOKIE_CHARS = 4096


def _derive(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"llmstack-console",
                info=purpose).derive(secret.encode())


@dataclass(frozen=True)
class ConsoleSession:
    api_key: str
    role: Role
    nonce: str
    issued_at: float


class SessionSealer:
    def __init__(self, secret: str, ttl_s: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the console secret must be at least 16 characters")
        self._fernet = Fernet(base64.urlsafe_b64encode(_derive(secret, b"cookie")))
        self._csrf_key = _derive(secret, b"csrf")
        self.ttl_s = ttl_s
        self.clock = clock

    def seal(self, api_key: str, role: Role) -> tuple[str, ConsoleSession]:
        session = ConsoleSession(api_key=api_key, role=role, nonce=secrets.token_urlsafe(16),
                                 issued_at=self.clock())
        payload = json.dumps({"k": api_key, "r": role, "n": session.nonce}).encode()
        token = self._fernet.encrypt_at_time(payload, int(session.issued_at)).decode()
        return token, session

    def open(self, cookie: str | None) -> ConsoleSession | None:
        """The session in a cookie, or None (missing, forged, tampered with or expired)."""
        if not cookie or len(cookie) > MAX_COOKIE_CHARS:
            return None
        try:
            token = cookie.encode("ascii")
            payload = self._fernet.decrypt_at_time(token, self.ttl_s, int(self.clock()))
            data = json.loads(payload)
            issued = Fernet.extract_timestamp(self._fernet, token)
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
            return None
        if data.get("r") not in ("admin", "approver") or not isinstance(data.get("k"), str):
            return None
        return ConsoleSession(api_key=data["k"], role=data["r"], nonce=str(data.get("n")),
                              issued_at=float(issued))

    def csrf_token(self, nonce: str) -> str:
        """The token forms of a session (or of a sign-in page, by its pre-session nonce)
        must send back."""
        return hmac.new(self._csrf_key, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(self.csrf_token(nonce), token)


def new_login_nonce() -> str:
    return secrets.token_urlsafe(16)
