"""Who may call the controller.

Bound to loopback with no token configured, anyone on this machine may (the
same trust as the engine's own process). With a token (``controller_token``,
``controller_token_file`` or ``KVTIER_CONTROLLER_TOKEN``), every endpoint
but ``/health`` requires ``Authorization: Bearer <token>``. A non-loopback
bind without a token is refused before anything listens (config.py checks
the configuration; :func:`check_bind` checks again for a Config built by
hand).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kvtier.config import Config, ConfigError, controller_is_loopback

ENV_TOKEN = "KVTIER_CONTROLLER_TOKEN"

# auto_error=False: the check below decides, so that a server without a
# token accepts requests without the header. The scheme still documents the
# header in the OpenAPI schema.
bearer = HTTPBearer(auto_error=False, description="controller_token (required when one is configured)")


def resolve_token(config: Config) -> str:
    """The configured token: controller_token (which KVTIER_CONTROLLER_TOKEN
    sets), else the content of controller_token_file; '' when neither."""
    if config.controller_token:
        return config.controller_token
    if not config.controller_token_file:
        return ""
    path = os.path.expanduser(config.controller_token_file)
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(f"controller_token_file {config.controller_token_file!r} cannot be read: {reason}") from None
    if not token:
        raise ConfigError(f"controller_token_file {config.controller_token_file!r} is empty")
    return token


def check_bind(listen: str, token: str) -> None:
    if not controller_is_loopback(listen) and not token:
        raise ConfigError(
            f"controller_listen {listen!r} is not a loopback address and no controller token is set "
            f"(controller_token, controller_token_file or {ENV_TOKEN})")


def _digest(value: str) -> bytes:
    # Equal-length inputs for compare_digest, whatever the caller sends.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def token_matches(credentials: HTTPAuthorizationCredentials | None, token: str) -> bool:
    if not token:
        return True
    if credentials is None or credentials.scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(_digest(credentials.credentials), _digest(token))


def require_token(token: str) -> Any:
    """A FastAPI dependency that refuses a missing or wrong bearer token."""

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not token_matches(credentials, token):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
