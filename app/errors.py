"""The one error type of the API and the handler that renders it as `{"error": ...}`."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and a message that says what failed and what to do.

    `extra` adds keys beside `error` in the body (for example the list of bad lines of an
    upload); `headers` adds response headers (for example `Retry-After`).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        extra: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}


def bad_request(message: str, **extra) -> ApiError:
    return ApiError(400, message, extra=extra)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def missing_key() -> ApiError:
    return ApiError(
        401, "Unauthorized: the X-API-Key header is missing. Send your key as X-API-Key: rd-..."
    )


def invalid_key() -> ApiError:
    return ApiError(
        401, "Unauthorized: the API key is invalid or revoked. Check the key or create a new one."
    )


def _format_validation_error(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        kind = error.get("type")
        if kind == "json_invalid":
            return (
                "Invalid request: the body is not valid JSON "
                f"({error.get('ctx', {}).get('error', 'parse error')}). Send a JSON object with "
                "Content-Type: application/json."
            )
        if kind == "dict_type" and error.get("loc", ())[:1] == ("body",):
            return "Invalid request: the body must be a JSON object, for example {\"run_name\": ...}."
        location = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        value = f"={error['input']!r}" if "input" in error and kind != "missing" else ""
        parts.append(f"{location or 'request'}{value}: {error.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.message, **exc.extra}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _format_validation_error(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"Not found: {request.url.path}. The API lives under /api/v2."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "Internal server error; the server log has the details."}, status_code=500
        )
