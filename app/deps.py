"""Typed dependencies of the routes: settings, database session, storage, the caller."""

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.accounts import Caller, CallerCache, authenticate
from app.db import get_sessionmaker, run_on_connection
from app.errors import ApiError
from app.ratelimit import RateLimiter
from app.security import hash_api_key
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


@lru_cache
def get_caller_cache() -> CallerCache:
    return CallerCache(get_settings().api_key_cache_ttl_s)


def _check_key_present(api_key: str | None) -> str:
    if not api_key:
        raise ApiError(
            401, "Unauthorized: the X-API-Key header is missing. Send your key as X-API-Key: rd-..."
        )
    return api_key.strip()


def _check_caller(caller: Caller | None) -> Caller:
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
    caller = _check_caller(authenticate(session, _check_key_present(x_api_key)))
    _enforce_limit(f"key:{caller.key_id}", settings.rate_limit_per_minute, "requests")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_caller_async(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Caller:
    """Authenticate like `get_caller`, for async routes, through the `CallerCache`.

    A cache hit needs no database query. A revoked key therefore keeps working here for
    up to `api_key_cache_ttl_s` seconds, while `get_caller` rejects it at once. The rate
    limit check may call Redis, which blocks, so it runs in a worker thread, and only when
    a limit is set.
    """
    api_key = _check_key_present(x_api_key)
    cache = get_caller_cache()
    key_hash = hash_api_key(api_key)
    caller = cache.get(key_hash)
    if caller is None:
        caller = _check_caller(await run_on_connection(authenticate, api_key))
        cache.put(key_hash, caller)
    if settings.rate_limit_per_minute > 0:
        await run_in_threadpool(
            _enforce_limit, f"key:{caller.key_id}", settings.rate_limit_per_minute, "requests"
        )
    return caller


AsyncCallerDep = Annotated[Caller, Depends(get_caller_async)]


def get_uploader(caller: CallerDep, settings: SettingsDep) -> Caller:
    _enforce_limit(f"upload:{caller.key_id}", settings.upload_rate_limit_per_minute, "uploads")
    return caller


UploaderDep = Annotated[Caller, Depends(get_uploader)]
