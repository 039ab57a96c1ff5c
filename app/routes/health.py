from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import SettingsDep
from app.health import check_broker, check_database

router = APIRouter()


@router.get("/healthz")
def healthz(settings: SettingsDep) -> JSONResponse:
    """Report whether the database and the broker are reachable; 503 when either is not."""
    checks = {"database": check_database(), "broker": check_broker(settings)}
    healthy = all(error is None for error in checks.values())
    body = {
        "status": "ok" if healthy else "unavailable",
        "checks": {name: error or "ok" for name, error in checks.items()},
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
