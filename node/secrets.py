"""Hashed secrets for the STOW-RS receiver's users and tokens (``mammo-node hash-secret``).

Passwords are stored as PBKDF2-SHA256 (``pbkdf2_sha256$<iterations>$<salt>$<hash>``, base64):
slow to guess from a leaked file. A bearer token is long and random, so one SHA-256 suffices
(``sha256$<hex>``) and verifying it costs nothing per request. Comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

PBKDF2_ITERATIONS = 200_000


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return (f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


def verify(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a hash made by :func:`hash_password` or :func:`hash_token`."""
    parts = stored.strip().split("$")
    try:
        if parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations, salt, digest = int(parts[1]), base64.b64decode(parts[2]), parts[3]
            got = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
            return hmac.compare_digest(base64.b64encode(got).decode(), digest)
        if parts[0] == "sha256" and len(parts) == 2:
            got_hex = hashlib.sha256(secret.encode()).hexdigest()
            return hmac.compare_digest(got_hex, parts[1])
    except (ValueError, TypeError):
        return False
    return False


def read_users(path: str | Path) -> dict[str, str]:
    """``name:hash`` lines (blank lines and # comments skipped)."""
    users = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, _, stored = line.partition(":")
            users[name.strip()] = stored.strip()
    return users


def read_tokens(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.strip().startswith("#")]
