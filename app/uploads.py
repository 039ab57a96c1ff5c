"""Receiving an uploaded preference file, which is parsed, validated and stored as it arrives.

The body is processed in batches of about 1 MB in a worker thread, so the event loop keeps
serving other requests meanwhile. Each batch goes through the multipart parser, and the bytes
of the `jsonl_file` part go to the validator, a SHA-256 hash and a storage writer. Memory
stays at about one batch plus `max_line_bytes`, whatever the file size. The stored object
becomes visible only when the whole file is valid.
"""

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread
import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from app.errors import ApiError
from app.multipart import PartReader
from app.settings import Settings
from app.storage import ObjectWriter, Storage, upload_key
from app.validation import PreferenceFileValidator, ValidationReport

logger = logging.getLogger(__name__)

FILE_FIELD = "jsonl_file"
BATCH_BYTES = 1024 * 1024
_HOW_TO_SEND = (
    "Send the file as multipart/form-data, for example with curl -F jsonl_file=@pairs.jsonl"
)


@dataclass(frozen=True)
class UploadResult:
    file_id: str
    filename: str
    pair_count: int
    size_bytes: int
    token_estimate: int
    sha256: str
    storage_key: str


class _FilePartSink(PartReader):
    """Multipart parser callbacks that route the `jsonl_file` part to validator and storage.

    The parser hands over part data in slices, and `flush` passes what one batch produced to
    the validator, the hash and the writer in one piece.
    """

    def __init__(self, storage: Storage, key: str, validator: PreferenceFileValidator) -> None:
        super().__init__()
        self.storage = storage
        self.key = key
        self.validator = validator
        self.hasher = hashlib.sha256()
        self.writer: ObjectWriter | None = None
        self.filename = ""
        self.size_bytes = 0
        self.file_started = False
        self.file_complete = False
        self._in_file = False
        self._pieces: list[bytes] = []

    def flush(self) -> None:
        if not self._pieces:
            return
        data = b"".join(self._pieces)
        self._pieces = []
        self.size_bytes += len(data)
        self.validator.feed(data)
        self.hasher.update(data)
        self.writer.write(data)

    def start_part(self, params: dict[bytes, bytes]) -> None:
        if params.get(b"name") != FILE_FIELD.encode():
            return
        if self.file_started:
            raise ApiError(
                400, f"The form has more than one {FILE_FIELD} field. Send exactly one file."
            )
        self.file_started = True
        self._in_file = True
        # Some clients on Windows send a full path, so keep only the file's own name.
        filename = params.get(b"filename", b"").decode("utf-8", "replace")
        self.filename = filename.replace("\\", "/").rsplit("/", 1)[-1]
        self.writer = self.storage.open_writer(self.key)

    def part_data(self, data: bytes) -> None:
        if self._in_file:
            self._pieces.append(data)

    def end_part(self) -> None:
        if self._in_file:
            self._in_file = False
            self.file_complete = True


def _too_large(max_upload_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"The upload is larger than {max_upload_bytes} bytes, the limit set by"
        " RUNDPO_MAX_UPLOAD_BYTES. Split the file into smaller ones or raise the limit.",
    )


def _make_parser(content_type: str, sink: _FilePartSink) -> python_multipart.MultipartParser:
    media_type, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            400,
            f"The request's Content-Type is {content_type!r}, not multipart/form-data with a"
            f" boundary. {_HOW_TO_SEND}.",
        )
    try:
        return python_multipart.MultipartParser(boundary, sink.callbacks())
    except FormParserError as error:
        raise ApiError(400, f"Invalid multipart boundary: {error}. {_HOW_TO_SEND}.") from None


def _rejection(report: ValidationReport) -> ApiError:
    lines = [
        {"line": problem.line, "field": problem.field, "message": problem.message}
        for problem in report.problems
    ]
    return ApiError(400, report.describe(), extra={"lines": lines})


async def _process_in_batches(
    request_stream: AsyncIterator[bytes],
    max_upload_bytes: int,
    process: Callable[[bytes], None],
) -> None:
    """Pass the body to `process` in a worker thread, about `BATCH_BYTES` at a time.

    Raises ApiError 413 as soon as the body passes `max_upload_bytes`.
    """
    received_bytes = 0
    batch: list[bytes] = []
    batch_bytes = 0
    async for chunk in request_stream:
        received_bytes += len(chunk)
        if received_bytes > max_upload_bytes:
            raise _too_large(max_upload_bytes)
        batch.append(chunk)
        batch_bytes += len(chunk)
        if batch_bytes >= BATCH_BYTES:
            await anyio.to_thread.run_sync(process, b"".join(batch))
            batch = []
            batch_bytes = 0
    if batch:
        await anyio.to_thread.run_sync(process, b"".join(batch))


async def receive_upload(
    request_stream: AsyncIterator[bytes],
    content_type: str,
    storage: Storage,
    settings: Settings,
    file_id: str,
    content_length: int | None = None,
) -> UploadResult:
    """Parse a multipart body, validate its `jsonl_file` part and store it under `file_id`.

    Raises ApiError: 413 as soon as the body (or its declared `content_length`) passes
    `settings.max_upload_bytes`, and 400 for a body that is not multipart/form-data, a
    missing `jsonl_file` field or an invalid preference file, with the bad lines under
    `lines`. Nothing is stored unless the upload succeeds.
    """
    max_upload_bytes = settings.max_upload_bytes
    if content_length is not None and content_length > max_upload_bytes:
        raise _too_large(max_upload_bytes)

    key = upload_key(file_id)
    validator = PreferenceFileValidator(settings.max_line_bytes)
    sink = _FilePartSink(storage, key, validator)
    parser = _make_parser(content_type, sink)

    def process(batch: bytes) -> None:
        try:
            parser.write(batch)
        except FormParserError as error:
            raise ApiError(
                400, f"The request body is not valid multipart/form-data: {error}. {_HOW_TO_SEND}."
            ) from None
        sink.flush()

    try:
        await _process_in_batches(request_stream, max_upload_bytes, process)
        if not sink.file_started:
            raise ApiError(400, f"The form has no {FILE_FIELD} field. {_HOW_TO_SEND}.")
        if not sink.file_complete:
            raise ApiError(
                400,
                f"The request body ended inside the {FILE_FIELD} part, so the upload was cut"
                " off. Send the file again.",
            )
        report = await anyio.to_thread.run_sync(validator.finish)
        if not report.ok:
            logger.info(
                "upload %s rejected: %d bad lines, %d valid pairs",
                file_id,
                report.bad_line_count,
                report.pair_count,
            )
            raise _rejection(report)
        await anyio.to_thread.run_sync(sink.writer.commit)
    finally:
        if sink.writer is not None:
            # Shielded so that a cancelled request (a client that went away) still aborts.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sink.writer.abort)

    logger.info(
        "upload %s stored: %d bytes, %d pairs, about %d tokens",
        file_id,
        sink.size_bytes,
        report.pair_count,
        report.token_estimate,
    )
    return UploadResult(
        file_id=file_id,
        filename=sink.filename,
        pair_count=report.pair_count,
        size_bytes=sink.size_bytes,
        token_estimate=report.token_estimate,
        sha256=sink.hasher.hexdigest(),
        storage_key=key,
    )
