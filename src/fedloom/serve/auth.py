"""Optional bearer-token authentication for the model service and the dashboard.

With a token set (``fedloom serve --token`` or ``FEDLOOM_SERVE_TOKEN``), every ``/v1/*`` and
dashboard ``/api/*`` request must carry ``Authorization: Bearer <token>`` or, for a
browser's EventSource (which cannot set headers), ``?access_token=<token>``. Compared in
constant time; a missing or wrong token is 401 with ``WWW-Authenticate: Bearer``.
"""

import hmac
from collections.abc import Callable
from typing import Any

__all__ = ["require_token"]


def require_token(token: str | None) -> Callable[..., Any]:  # no __future__ annotations: FastAPI reads check's at run time
    """A FastAPI dependency that checks ``token`` (a no-op when it is None)."""
    from fastapi import HTTPException, Request

    def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("access_token", "")
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (Authorization: Bearer <token>, or ?access_token=)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
