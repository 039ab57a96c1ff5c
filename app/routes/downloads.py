from fastapi import APIRouter
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select

from app.deps import SessionDep, SettingsDep, StorageDep
from app.downloads import token_is_valid
from app.errors import not_found
from app.models import Run
from app.statuses import RunStatus
from app.storage import LocalStorage

router = APIRouter()


@router.get("/download_adapter/{run_name}.zip")
def download_adapter(run_name: str, token: str, session: SessionDep, settings: SettingsDep, storage: StorageDep):
    """Download a finished run's adapter zip; the link's signed token replaces the API key."""
    missing = not_found("Adapter not found, or the download link is invalid or expired. "
                        "Call get_status for a fresh download_url.")
    if not token_is_valid(settings, run_name, token):
        raise missing
    run = session.scalar(select(Run).where(Run.name == run_name))
    if run is None or run.status != RunStatus.COMPLETE.value or not run.adapter_key:
        raise missing
    if not storage.exists(run.adapter_key):
        raise missing

    filename = f"{run.name}.zip"
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.local_path(run.adapter_key), media_type="application/zip", filename=filename)
    return StreamingResponse(
        storage.iter_chunks(run.adapter_key),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(storage.size(run.adapter_key)),
        },
    )
