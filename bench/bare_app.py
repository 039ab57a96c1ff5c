"""A bare FastAPI app that serves a fixed get_status body, with no database and no API key.

`bench/api.py` measures it beside the real API, under the same uvicorn settings, as the
ceiling for get_status on the same machine. The body is read once at start-up from the
JSON file named by `BENCH_STATUS_BODY`.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI


def create_app() -> FastAPI:
    body = json.loads(Path(os.environ["BENCH_STATUS_BODY"]).read_text())
    app = FastAPI(title="bare get_status")

    @app.get("/api/v2/get_status")
    async def get_status() -> dict[str, Any]:
        return body

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    """Serve the app with the uvicorn arguments that `rundpo-server api` passes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    uvicorn.run(
        "bench.bare_app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
