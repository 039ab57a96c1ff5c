"""Object storage on an S3-compatible service (AWS S3, MinIO, Ceph RGW) through boto3.

Only this module imports boto3, so a process that keeps its files on local disk never loads it.
Objects live under `s3://BUCKET/PREFIX/<key>`. A writer streams an object as a multipart upload
of `PART_BYTES` parts and so buffers at most one part in memory.
"""

import io
import logging
from typing import BinaryIO
from urllib.parse import urlparse

import boto3
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.settings import Settings
from app.storage import CHUNK_BYTES, ObjectWriter, Storage

logger = logging.getLogger(__name__)

PART_BYTES = 8 * 1024 * 1024
# SigV4 presigned URLs are valid for at most 7 days (X-Amz-Expires <= 604800).
MAX_PRESIGN_TTL_S = 7 * 24 * 3600

_MISSING_KEY_CODES = {"404", "NoSuchKey", "NotFound"}


def _is_missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in _MISSING_KEY_CODES


class _S3Writer(ObjectWriter):
    """A streaming write: one `put_object` for a small object, else a multipart upload.

    Parts are sent as soon as `PART_BYTES` have been written, so the object exists nowhere
    until `commit` completes the upload, and `abort` deletes the parts already sent.
    """

    def __init__(self, client, bucket: str, key: str) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._buffer = io.BytesIO()
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise ValueError(f"write to s3://{self._bucket}/{self._key} after commit or abort")
        view = memoryview(data)
        while view:
            room = PART_BYTES - self._buffer.tell()
            self._buffer.write(view[:room])
            view = view[room:]
            if self._buffer.tell() == PART_BYTES:
                self._send_part()

    def _send_part(self) -> None:
        if self._upload_id is None:
            created = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            self._upload_id = created["UploadId"]
        part_number = len(self._parts) + 1
        self._buffer.seek(0)
        sent = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=part_number,
            Body=self._buffer,
        )
        self._parts.append({"PartNumber": part_number, "ETag": sent["ETag"]})
        self._buffer = io.BytesIO()

    def commit(self) -> None:
        if self._done:
            raise ValueError(f"s3://{self._bucket}/{self._key} was already committed or aborted")
        try:
            if self._upload_id is None:
                self._buffer.seek(0)
                self._client.put_object(Bucket=self._bucket, Key=self._key, Body=self._buffer)
            else:
                # The last part may be smaller than the 5 MiB minimum, or absent when the
                # size is a whole number of parts.
                if self._buffer.tell():
                    self._send_part()
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        except BaseException:
            self.abort()
            raise
        self._buffer = io.BytesIO()
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer = io.BytesIO()
        if self._upload_id is None:
            return
        try:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
            )
        except (BotoCoreError, ClientError):
            # The parts stay stored until the server drops incomplete uploads: on AWS through
            # an AbortIncompleteMultipartUpload lifecycle rule, on MinIO after its
            # `stale_uploads_expiry` (24 h by default).
            logger.exception(
                "aborting multipart upload %s of s3://%s/%s failed",
                self._upload_id,
                self._bucket,
                self._key,
            )


class _BodyStream(io.RawIOBase):
    """A raw binary stream over a `get_object` body, so callers get a regular file object."""

    def __init__(self, body) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str = "",
        public_endpoint_url: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        region: str = "us-east-1",
    ) -> None:
        """Connect to `bucket`; keys are stored under `prefix/`.

        `public_endpoint_url` is the endpoint that presigned links point at, for when users
        reach the service under another name than the API does (`http://minio:9000` inside
        compose, `https://s3.example.com` outside). SigV4 signs the host, so links must be
        signed for the public name, not rewritten afterwards. Empty credentials fall back to
        boto3's default chain (environment, config files, instance role).
        """
        if not bucket:
            raise ValueError("S3 storage needs a bucket name: use s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=region or None,
        )
        # Path-style addressing (`http://host/bucket/key`) works with MinIO and other
        # self-hosted services without wildcard DNS for bucket subdomains.
        addressing_style = "path" if endpoint_url else "auto"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            retries={"max_attempts": 5, "mode": "standard"},
            # Checksums only where the API requires them: botocore >= 1.36 otherwise sends
            # CRC trailers that several S3-compatible servers reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=10,
            read_timeout=60,
        )
        self._client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        if public_endpoint_url and public_endpoint_url != endpoint_url:
            # Presigning is computed locally, so this client never opens a connection.
            self._presign_client = session.client(
                "s3", endpoint_url=public_endpoint_url, config=config
            )
        else:
            self._presign_client = self._client

    @classmethod
    def from_settings(cls, settings: Settings) -> "S3Storage":
        parsed = urlparse(settings.storage_url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(
                f"RUNDPO_STORAGE_URL={settings.storage_url!r} is not an S3 URL; "
                "use s3://BUCKET/PREFIX"
            )
        return cls(
            parsed.netloc,
            parsed.path,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            region=settings.s3_region,
        )

    def _object_key(self, key: str) -> str:
        # Keys are relative paths, as in LocalStorage; reject those that would leave the
        # prefix so that both backends accept the same keys.
        parts = key.split("/")
        if not key or key.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"storage key {key!r} is not a relative path inside the storage")
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_writer(self, key: str) -> ObjectWriter:
        return _S3Writer(self._client, self.bucket, self._object_key(key))

    def open_reader(self, key: str) -> BinaryIO:
        object_key = self._object_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=object_key)
        except ClientError as error:
            if _is_missing(error):
                raise FileNotFoundError(f"s3://{self.bucket}/{object_key} not found") from error
            raise
        return io.BufferedReader(_BodyStream(response["Body"]), CHUNK_BYTES)

    def _head(self, key: str) -> dict | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as error:
            if _is_missing(error):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(f"s3://{self.bucket}/{self._object_key(key)} not found")
        return head["ContentLength"]

    def delete(self, key: str) -> None:
        # S3 returns success for a delete of a missing key, like `unlink(missing_ok=True)`.
        self._client.delete_object(Bucket=self.bucket, Key=self._object_key(key))

    def presigned_url(self, key: str, ttl_s: int) -> str:
        """Return a GET link valid for `ttl_s` seconds, capped at SigV4's 7 days.

        The link names the object's last path segment as the download's file name.
        """
        filename = key.rsplit("/", 1)[-1]
        return self._presign_client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._object_key(key),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=max(1, min(ttl_s, MAX_PRESIGN_TTL_S)),
        )
