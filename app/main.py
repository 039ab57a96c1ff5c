"""The FastAPI application."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app import __version__
from app.db import session_scope
from app.errors import install_error_handlers
from app.queue import enqueue_pending_runs
from app.routes import account, dashboard, downloads, events, files, health, runs
from app.runs import fail_lost_runs
from app.settings import get_settings

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v2"


def _housekeeping() -> None:
    """Send runs committed while the broker was unreachable; fail runs of lost workers.

    Workers sweep lost runs too; the API does it as well so that runs do not stay stuck
    when every worker is gone.
    """
    with session_scope() as session:
        sent = enqueue_pending_runs(session)
    if sent:
        logger.info("enqueued %d runs that were waiting for the broker", sent)
    with session_scope() as session:
        fail_lost_runs(session, get_settings())


async def _housekeeping_forever(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await run_in_threadpool(_housekeeping)
        except Exception:
            logger.exception("housekeeping failed; retrying in %.0f s", interval_s)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(_housekeeping_forever(get_settings().enqueue_retry_s))
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
    for module in (files, runs, events, account, downloads):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    app.mount(
        "/dashboard/static", StaticFiles(directory=dashboard.STATIC_DIR), name="dashboard-static"
    )
    return app
