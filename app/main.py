"""The FastAPI application."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.db import session_scope
from app.errors import install_error_handlers
from app.queue import enqueue_pending_runs
from app.routes import account, downloads, files, health, runs
from app.settings import get_settings

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v2"


def _enqueue_pending() -> int:
    with session_scope() as session:
        return enqueue_pending_runs(session)


async def _retry_enqueue_forever(interval_s: float) -> None:
    """Send runs that were committed while the broker was unreachable."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            sent = await run_in_threadpool(_enqueue_pending)
        except Exception:
            logger.exception("retrying the enqueue of pending runs failed")
            continue
        if sent:
            logger.info("enqueued %d runs that were waiting for the broker", sent)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(_retry_enqueue_forever(get_settings().enqueue_retry_s))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app() -> FastAPI:
    app = FastAPI(
        title="rundpo-server",
        version=__version__,
        description="Self-hosted, RunDPO-compatible DPO fine-tuning API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for module in (files, runs, account, downloads):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(health.router)
    return app
