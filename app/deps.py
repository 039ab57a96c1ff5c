"""Typed dependencies of the routes: settings, database session, storage, the caller."""

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.accounts import Caller, authenticate
from app.db import get_sessionmaker
from app.errors import ApiError, invalid_key, missing_key
from app.ratelimit import RateLimiter
from app.settings import Settings, get_settings
from app.storage import Storage, make_storage


async def current_settings() -> Settings:
    # FastAPI runs an async dependency on the event loop, but a plain function in a worker thread.
    return get_settings()


SettingsDep = Annotated[Settings, Depends(current_settings)]


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


async def current_storage() -> Storage:
    return get_storage()


StorageDep = Annotated[Storage, Depends(current_storage)]


@lru_cache
def get_rate_limiter() -> RateLimiter:
    return RateLimiter(get_settings().shared_redis_url)


def check_key_present(api_key: str | None) -> str:
    if not api_key:
        raise missing_key()
    return api_key.strip()


def _check_caller(caller: Caller | None) -> Caller:
    if caller is None:
        raise invalid_key()
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
    caller = _check_caller(authenticate(session, check_key_present(x_api_key)))
    _enforce_limit(f"key:{caller.key_id}", settings.rate_limit_per_minute, "requests")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


async def enforce_request_limit(settings: Settings, key_id: int) -> None:
    """Count a request against its key's limit, for async routes.

    The check may call Redis, which blocks, so it runs in a worker thread, and only when a
    limit is set.
    """
    if settings.rate_limit_per_minute > 0:
        await run_in_threadpool(
            _enforce_limit, f"key:{key_id}", settings.rate_limit_per_minute, "requests"
        )


def get_uploader(caller: CallerDep, settings: SettingsDep) -> Caller:
    _enforce_limit(f"upload:{caller.key_id}", settings.upload_rate_limit_per_minute, "uploads")
    return caller


UploaderDep = Annotated[Caller, Depends(get_uploader)]
