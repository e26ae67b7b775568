"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Routes raise `APIError`; the app turns it (and any other failure) into that body with an honest
status code, so every client, the official `openai` package included, reads the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          503: "server_error", 500: "server_error"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    """400 for one named request parameter."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def busy(message: str, retry_after_s: int = 1, code: str = "out_of_kv_pages") -> APIError:
    """503 with Retry-After: the server is healthy but has no room for this request right now."""
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after_s)})
