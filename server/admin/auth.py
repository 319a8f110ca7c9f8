"""API keys: user keys for completions and training, a separate admin key for /admin.

Keys are compared in constant time and never logged. With no user keys configured the
user endpoints are open (the demo); the admin endpoints are closed until an admin key is set.
The admin key is also a user key: whoever may roll the model back may query and train it.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    # compare against every key, so the time taken does not reveal which one (or none) matched
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def require_admin(request: Request) -> None:
    """FastAPI dependency for /admin: 401 without a key, 403 with a wrong one."""
    admin_key = request.app.state.settings.admin_key
    if admin_key is None:
        raise APIError(403, "admin endpoints are disabled: set LAMINA_ADMIN_KEY.", type="permission_error")
    token = _bearer(request)
    if token is None:
        raise APIError(401, "missing admin key (Authorization: Bearer <key>).", type="authentication_error")
    if not _matches(token, [admin_key.get_secret_value()]):
        raise APIError(403, "this key may not use the admin endpoints.", type="permission_error")


def key_fingerprint(request: Request) -> str:
    """Who did an admin action, for the ledger's audit entries: the first 12 hex digits of the
    sha256 of the bearer key (never the key), so actions can be told apart and matched against a
    key one holds, while the ledger reveals nothing usable."""
    token = _bearer(request) or ""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def require_user(request: Request) -> None:
    """FastAPI dependency for user endpoints: open when no user keys are configured."""
    settings = request.app.state.settings
    keys = [k.get_secret_value() for k in settings.api_keys]
    if not keys:
        return
    if settings.admin_key is not None:
        keys.append(settings.admin_key.get_secret_value())
    token = _bearer(request)
    if token is None:
        raise APIError(401, "missing API key (Authorization: Bearer <key>).", type="authentication_error")
    if not _matches(token, keys):
        raise APIError(401, "invalid API key.", type="authentication_error", code="invalid_api_key")
