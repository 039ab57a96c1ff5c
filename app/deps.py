"""Typed dependencies of the routes: settings, database session, storage, the caller."""

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.accounts import Caller, authenticate
from app.db import get_sessionmaker
from app.errors import ApiError
from app.ratelimit import RateLimiter
from app.settings import Settings, get_settings
from app.storage import Storage, make_storage

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


@lru_cache
def get_storage() -> Storage:
    return make_storage(get_settings())


StorageDep = Annotated[Storage, Depends(get_storage)]


@lru_cache
def get_rate_limiter() -> RateLimiter:
    return RateLimiter(get_settings().shared_redis_url)


def _authenticate(session: Session, api_key: str | None) -> Caller:
    if not api_key:
        raise ApiError(
            401, "Unauthorized: the X-API-Key header is missing. Send your key as X-API-Key: rd-..."
        )
    caller = authenticate(session, api_key.strip())
    if caller is None:
        raise ApiError(
            401, "Unauthorized: the API key is invalid or revoked. Check the key or create a new one."
        )
    return caller


def _enforce_limit(bucket: str, limit: int, what: str) -> None:
    retry_after = get_rate_limiter().hit(bucket, limit)
    if retry_after is not None:
        raise ApiError(
            429,
            f"Too many requests: at most {limit} {what} per minute per API key. "
            f"Retry after {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )


def get_caller(
    session: SessionDep,
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    caller = _authenticate(session, x_api_key)
    _enforce_limit(f"key:{caller.key_id}", settings.rate_limit_per_minute, "requests")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_uploader(caller: CallerDep, settings: SettingsDep) -> Caller:
    _enforce_limit(f"upload:{caller.key_id}", settings.upload_rate_limit_per_minute, "uploads")
    return caller


UploaderDep = Annotated[Caller, Depends(get_uploader)]
