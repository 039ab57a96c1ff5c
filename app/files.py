"""Uploaded preference files: ids, records and listing."""

import secrets
import string

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.accounts import Caller
from app.models import PreferenceFile
from app.uploads import UploadResult

FILE_ID_ALPHABET = string.ascii_letters


def new_file_id() -> str:
    """Return a random id of 32 letters, like the hosted service's."""
    return "".join(secrets.choice(FILE_ID_ALPHABET) for _ in range(32))


def record_upload(session: Session, caller: Caller, result: UploadResult) -> PreferenceFile:
    upload = PreferenceFile(
        id=result.file_id,
        account_id=caller.account_id,
        name=result.filename,
        pair_count=result.pair_count,
        size_bytes=result.size_bytes,
        token_estimate=result.token_estimate,
        sha256=result.sha256,
        storage_key=result.storage_key,
    )
    session.add(upload)
    session.commit()
    return upload


def list_files(session: Session, caller: Caller) -> list[PreferenceFile]:
    """Return the caller's files, newest first."""
    return list(
        session.scalars(
            select(PreferenceFile)
            .where(PreferenceFile.account_id == caller.account_id)
            .order_by(PreferenceFile.created_at.desc(), PreferenceFile.id)
        )
    )
