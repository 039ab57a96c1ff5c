from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app import files
from app.deps import CallerDep, SessionDep, SettingsDep, StorageDep, UploaderDep
from app.routing import endpoint
from app.runs import as_utc
from app.uploads import receive_upload

router = APIRouter()


@endpoint(router, "upload_file", ["POST"])
async def upload_file(
    request: Request,
    caller: UploaderDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> dict[str, Any]:
    """Upload a JSONL preference file as the multipart field `jsonl_file`."""
    content_length = request.headers.get("content-length")
    result = await receive_upload(
        request.stream(),
        request.headers.get("content-type", ""),
        storage,
        settings,
        files.new_file_id(),
        content_length=int(content_length) if content_length and content_length.isdigit() else None,
    )
    try:
        await run_in_threadpool(files.record_upload, session, caller, result)
    except BaseException:
        storage.delete(result.storage_key)
        raise
    return {"uploaded": True, "lineCount": result.pair_count, "file_id": result.file_id}


@endpoint(router, "list_files", ["GET", "POST"])
def list_files(caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    """List the caller's files, newest first."""
    uploads = files.list_files(session, caller)
    return {
        "file_ids": [upload.id for upload in uploads],
        "files": [
            {
                "file_id": upload.id,
                "name": upload.name,
                "lineCount": upload.pair_count,
                "bytes": upload.size_bytes,
                "created_at": as_utc(upload.created_at).isoformat(),
            }
            for upload in uploads
        ],
    }
