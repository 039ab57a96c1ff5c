"""Dashboard sign-in sessions: a signed cookie that names an API key, and CSRF tokens.

The session cookie contains the API key's id, a random session id and a signed expiry, never
the key itself. Every request checks the signature and the expiry, that the session was not
signed out, and that the key is still live, so revoking a key ends its sessions at once.

Each form that changes something carries a CSRF token derived from the session id with the
signing secret. The sign-in form, which has no session yet, uses a token bound to a
short-lived random cookie instead.
"""

import base64
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache

import python_multipart
from fastapi import Request, Response
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.accounts import Caller
from app.models import Account, ApiKey
from app.multipart import PartReader
from app.security import sign_token, signing_secret, verify_token
from app.settings import Settings

logger = logging.getLogger(__name__)

SESSION_COOKIE = "rundpo_session"
SIGN_IN_COOKIE = "rundpo_sign_in"
COOKIE_PATH = "/dashboard"
CSRF_FIELD = "csrf_token"

# A dashboard session lasts `web_session_ttl_s` after sign-in; activity does not extend it.
# How long a sign-in form stays valid after the page was loaded.
SIGN_IN_TTL_S = 3600

_SESSION_PURPOSE = "dashboard-session"
_CSRF_PURPOSE = "dashboard-csrf"
_SIGN_IN_PURPOSE = "dashboard-sign-in"


class CsrfError(Exception):
    """A form arrived without the CSRF token of the session that sent it."""


@dataclass(frozen=True)
class WebSession:
    session_id: str
    caller: Caller
    csrf_token: str
    expires_at: int


def _mac(secret: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(secret, f"{purpose}:{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def request_is_https(request: Request) -> bool:
    """Tell whether the browser reached us over HTTPS, directly or through a proxy."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request_is_https(request),
    )


def _delete_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(
        name, path=COOKIE_PATH, httponly=True, samesite="strict", secure=request_is_https(request)
    )


class EndedSessions:
    """The ids of signed-out sessions until their cookies would have expired anyway.

    With a Redis URL every API process shares the list; without one each process keeps its
    own.
    """

    def __init__(self, redis_url: str = "") -> None:
        self._redis = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2)
        self._lock = threading.Lock()
        self._local: dict[str, int] = {}

    def add(self, session_id: str, expires_at: int) -> None:
        ttl_s = max(1, expires_at - int(time.time()))
        with self._lock:
            self._local[session_id] = expires_at
            now = time.time()
            self._local = {key: end for key, end in self._local.items() if end >= now}
        if self._redis is not None:
            import redis

            try:
                self._redis.set(f"rundpo:ended-session:{session_id}", 1, ex=ttl_s)
            except redis.RedisError as exc:
                logger.warning("could not record a sign-out in Redis, kept locally: %s", exc)

    def contains(self, session_id: str) -> bool:
        with self._lock:
            if session_id in self._local:
                return True
        if self._redis is not None:
            import redis

            try:
                return bool(self._redis.exists(f"rundpo:ended-session:{session_id}"))
            except redis.RedisError as exc:
                logger.warning("could not check signed-out sessions in Redis: %s", exc)
        return False


@lru_cache
def ended_sessions(redis_url: str) -> EndedSessions:
    # NOTE: without Redis, several API processes each keep their own list, so a signed-out
    # cookie sent to another process stays valid until it expires or its key is revoked.
    return EndedSessions(redis_url)


def start_session(settings: Settings, caller: Caller) -> str:
    """Return the cookie value of a new session for `caller`'s API key."""
    session_id = secrets.token_urlsafe(18)
    token = sign_token(
        signing_secret(settings),
        _SESSION_PURPOSE,
        f"{caller.key_id}:{session_id}",
        settings.web_session_ttl_s,
    )
    logger.info("dashboard sign-in: account %s, key %s", caller.account_id, caller.key_prefix)
    return f"{caller.key_id}.{session_id}.{token}"


def read_session(session: Session, settings: Settings, cookie: str | None) -> WebSession | None:
    """Return the session a cookie proves, or None when it is invalid, expired or ended."""
    if not cookie:
        return None
    parts = cookie.split(".")
    if len(parts) != 4 or not parts[0].isdigit():
        return None
    key_id_text, session_id, expires_text, signature = parts
    token = f"{expires_text}.{signature}"
    secret = signing_secret(settings)
    if not verify_token(secret, _SESSION_PURPOSE, f"{key_id_text}:{session_id}", token):
        return None
    if ended_sessions(settings.shared_redis_url).contains(session_id):
        return None

    row = session.execute(
        select(ApiKey, Account.name)
        .join(Account, Account.id == ApiKey.account_id)
        .where(ApiKey.id == int(key_id_text))
    ).first()
    if row is None or row[0].revoked_at is not None:
        return None
    api_key, account_name = row
    caller = Caller(api_key.account_id, account_name, api_key.id, api_key.prefix)
    return WebSession(
        session_id=session_id,
        caller=caller,
        csrf_token=_mac(secret, _CSRF_PURPOSE, session_id),
        expires_at=int(expires_text),
    )


def end_session(settings: Settings, web_session: WebSession) -> None:
    ended_sessions(settings.shared_redis_url).add(web_session.session_id, web_session.expires_at)
    logger.info(
        "dashboard sign-out: account %s, key %s",
        web_session.caller.account_id,
        web_session.caller.key_prefix,
    )


def set_session_cookie(
    response: Response, request: Request, settings: Settings, value: str
) -> None:
    _set_cookie(response, request, SESSION_COOKIE, value, settings.web_session_ttl_s)


def clear_session_cookie(response: Response, request: Request) -> None:
    _delete_cookie(response, request, SESSION_COOKIE)


def check_csrf(web_session: WebSession, submitted: str | None) -> None:
    """Raise `CsrfError` unless `submitted` is the session's CSRF token."""
    if not submitted or not hmac.compare_digest(submitted, web_session.csrf_token):
        raise CsrfError()


def start_sign_in(settings: Settings) -> tuple[str, str]:
    """Return a random nonce for the sign-in cookie and the sign-in form's token bound to it."""
    nonce = secrets.token_urlsafe(18)
    return nonce, sign_token(signing_secret(settings), _SIGN_IN_PURPOSE, nonce, SIGN_IN_TTL_S)


def set_sign_in_cookie(response: Response, request: Request, nonce: str) -> None:
    _set_cookie(response, request, SIGN_IN_COOKIE, nonce, SIGN_IN_TTL_S)


def check_sign_in_csrf(settings: Settings, request: Request, submitted: str | None) -> None:
    """Raise `CsrfError` unless `submitted` matches this browser's sign-in cookie."""
    nonce = request.cookies.get(SIGN_IN_COOKIE)
    if not nonce or not submitted:
        raise CsrfError()
    if not verify_token(signing_secret(settings), _SIGN_IN_PURPOSE, nonce, submitted):
        raise CsrfError()


def clear_sign_in_cookie(response: Response, request: Request) -> None:
    _delete_cookie(response, request, SIGN_IN_COOKIE)


class _CsrfFieldReader(PartReader):
    """Multipart parser callbacks that keep the value of the `csrf_token` field."""

    MAX_TOKEN_BYTES = 256

    def __init__(self) -> None:
        super().__init__()
        self.token: str | None = None
        self.file_started = False
        self._in_token = False
        self._value = b""

    def start_part(self, params: dict[bytes, bytes]) -> None:
        if b"filename" in params:
            self.file_started = True
        self._in_token = params.get(b"name") == CSRF_FIELD.encode() and self.token is None
        self._value = b""

    def part_data(self, data: bytes) -> None:
        if self._in_token and len(self._value) <= self.MAX_TOKEN_BYTES:
            self._value += data

    def end_part(self) -> None:
        if self._in_token:
            self.token = self._value.decode("ascii", "replace").strip()
            self._in_token = False


async def require_csrf_field(
    stream: AsyncIterator[bytes], content_type: str, web_session: WebSession
) -> AsyncIterator[bytes]:
    """Pass a multipart body through once its CSRF field, sent before any file, is valid.

    The upload form puts `csrf_token` first and browsers send fields in page order, so the
    check happens before any byte of the file is passed on. A body whose first file part
    starts before a valid token raises `CsrfError`. After the check the body passes through
    unparsed, and the upload parser reports any later problem with it.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise CsrfError()
    reader = _CsrfFieldReader()
    try:
        parser = python_multipart.MultipartParser(boundary, reader.callbacks())
    except FormParserError:
        raise CsrfError() from None

    checked = False
    async for chunk in stream:
        if not checked:
            try:
                parser.write(chunk)
            except FormParserError:
                raise CsrfError() from None
            if reader.token is not None:
                check_csrf(web_session, reader.token)
                checked = True
            elif reader.file_started:
                raise CsrfError()
        yield chunk
    if not checked:
        raise CsrfError()
