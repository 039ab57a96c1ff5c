"""Download links for finished adapters.

The official client downloads with no API key header, so a link carries a signed token that
is bound to its run and expires. With S3 storage the link is a presigned S3 URL instead.
"""

from urllib.parse import quote

from app.models import Run
from app.security import sign_token, signing_secret, verify_token
from app.settings import Settings
from app.storage import Storage

DOWNLOAD_PURPOSE = "adapter-download"


def download_url(settings: Settings, storage: Storage, run: Run) -> str | None:
    if not run.adapter_key:
        return None
    presigned = storage.presigned_url(run.adapter_key, settings.download_link_ttl_s)
    if presigned:
        return presigned
    token = sign_token(
        signing_secret(settings), DOWNLOAD_PURPOSE, run.name, settings.download_link_ttl_s
    )
    base = settings.public_url.rstrip("/")
    return f"{base}/api/v2/download_adapter/{quote(run.name)}.zip?token={quote(token)}"


def token_is_valid(settings: Settings, run_name: str, token: str) -> bool:
    return verify_token(signing_secret(settings), DOWNLOAD_PURPOSE, run_name, token)
