import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from app.errors import ApiError
from app.settings import Settings
from app.storage import LocalStorage, upload_key
from app.uploads import UploadResult, receive_upload

CASES = Path(__file__).parent / "cases"
DATA = Path(__file__).parents[1] / "examples" / "data"
FILE_ID = "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEf"


def multipart(files: dict | None = None, fields: dict | None = None) -> tuple[bytes, str]:
    """Encode a form with httpx's client encoder, returning the body and its Content-Type."""
    request = httpx.Request("POST", "http://testserver/", files=files, data=fields)
    return request.read(), request.headers["content-type"]


async def chunked(body: bytes, chunk_bytes: int, consumed: list[int] | None = None):
    for start in range(0, len(body), chunk_bytes):
        if consumed is not None:
            consumed.append(start + chunk_bytes)
        yield body[start : start + chunk_bytes]


def upload(
    body: bytes | AsyncIterator[bytes],
    content_type: str,
    storage: LocalStorage,
    settings: Settings,
    chunk_bytes: int = 64 * 1024,
    content_length: int | None = None,
) -> UploadResult:
    stream = chunked(body, chunk_bytes) if isinstance(body, bytes) else body
    return anyio.run(
        lambda: receive_upload(
            stream, content_type, storage, settings, FILE_ID, content_length=content_length
        )
    )


def stored_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, max_upload_bytes=64 * 1024**2, max_line_bytes=4 * 1024**2)


def test_good_file_stored_byte_identical(storage, settings):
    data = (DATA / "dpo_en_demo.messages.jsonl").read_bytes()
    body, content_type = multipart(files={"jsonl_file": ("pairs.jsonl", data)})
    result = upload(body, content_type, storage, settings)
    assert result == UploadResult(
        file_id=FILE_ID,
        filename="pairs.jsonl",
        pair_count=300,
        size_bytes=len(data),
        token_estimate=result.token_estimate,
        sha256=hashlib.sha256(data).hexdigest(),
        storage_key=upload_key(FILE_ID),
    )
    assert result.token_estimate > 0
    assert storage.local_path(result.storage_key).read_bytes() == data
    assert stored_files(storage.root) == [storage.local_path(result.storage_key)]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 3 * 1024 * 1024])
def test_chunk_sizes_store_same_bytes(storage, settings, chunk_bytes):
    data = (CASES / "15-trailing-blank-lines-crlf.jsonl").read_bytes()
    body, content_type = multipart(files={"jsonl_file": ("crlf.jsonl", data)})
    result = upload(body, content_type, storage, settings, chunk_bytes=chunk_bytes)
    assert result.pair_count == 2
    assert storage.local_path(result.storage_key).read_bytes() == data


def test_hand_built_body_with_other_fields(storage, settings):
    data = (CASES / "14-bom.jsonl").read_bytes()
    boundary = "----rundpo-test-boundary"
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="note"\r\n\r\n',
            b"first field\r\n",
            f"--{boundary}\r\n".encode(),
            b'content-disposition: form-data; name="jsonl_file";'
            b' filename="C:\\data\\bom.jsonl"\r\n',
            b"Content-Type: application/jsonl\r\n\r\n",
            data,
            f"\r\n--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="last"\r\n\r\n',
            b"--not a boundary\r\n",
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    content_type = f"multipart/form-data; boundary={boundary}"
    result = upload(body, content_type, storage, settings, chunk_bytes=5)
    assert result.filename == "bom.jsonl"
    assert result.pair_count == 2
    assert storage.local_path(result.storage_key).read_bytes() == data


def test_bad_file_rejected_and_not_stored(storage, settings):
    data = (CASES / "01-empty-response.jsonl").read_bytes()
    body, content_type = multipart(files={"jsonl_file": ("bad.jsonl", data)})
    with pytest.raises(ApiError) as raised:
        upload(body, content_type, storage, settings, chunk_bytes=100)
    error = raised.value
    assert error.status_code == 400
    assert error.message.startswith(
        "Invalid preference file: 2 bad lines. line 2: chosen[1].content: is empty."
    )
    assert "line 3: rejected[1].content: is only whitespace." in error.message
    assert [(line["line"], line["field"]) for line in error.extra["lines"]] == [
        (2, "chosen[1].content"),
        (3, "rejected[1].content"),
    ]
    assert all(line["message"] for line in error.extra["lines"])
    assert stored_files(storage.root) == []


def test_bad_lines_listed_up_to_twenty(storage, settings):
    data = b"[]\n" * 30
    body, content_type = multipart(files={"jsonl_file": ("bad.jsonl", data)})
    with pytest.raises(ApiError) as raised:
        upload(body, content_type, storage, settings)
    assert len(raised.value.extra["lines"]) == 20
    assert "30 bad lines" in raised.value.message
    assert "and 10 more" in raised.value.message


def test_empty_file_rejected(storage, settings):
    body, content_type = multipart(files={"jsonl_file": ("empty.jsonl", b"")})
    with pytest.raises(ApiError) as raised:
        upload(body, content_type, storage, settings)
    assert raised.value.status_code == 400
    assert "no preference pair" in raised.value.message
    assert stored_files(storage.root) == []


def test_oversized_body_rejected_early(storage, tmp_path):
    settings = Settings(data_dir=tmp_path, max_upload_bytes=64 * 1024)
    data = (DATA / "dpo_en_demo.messages.jsonl").read_bytes()
    body, content_type = multipart(files={"jsonl_file": ("big.jsonl", data)})
    consumed: list[int] = []
    with pytest.raises(ApiError) as raised:
        upload(chunked(body, 16 * 1024, consumed), content_type, storage, settings)
    assert raised.value.status_code == 413
    assert "65536 bytes" in raised.value.message
    assert "RUNDPO_MAX_UPLOAD_BYTES" in raised.value.message
    assert consumed[-1] <= 64 * 1024 + 16 * 1024
    assert stored_files(storage.root) == []


def test_oversized_content_length_rejected(storage, tmp_path):
    settings = Settings(data_dir=tmp_path, max_upload_bytes=64 * 1024)
    consumed: list[int] = []
    body, content_type = multipart(files={"jsonl_file": ("big.jsonl", b"x")})
    with pytest.raises(ApiError) as raised:
        upload(
            chunked(body, 1024, consumed),
            content_type,
            storage,
            settings,
            content_length=10 * 1024**3,
        )
    assert raised.value.status_code == 413
    assert consumed == []


def test_missing_file_field_rejected(storage, settings):
    data = (CASES / "14-bom.jsonl").read_bytes()
    body, content_type = multipart(files={"file": ("pairs.jsonl", data)}, fields={"a": "b"})
    with pytest.raises(ApiError) as raised:
        upload(body, content_type, storage, settings)
    assert raised.value.status_code == 400
    assert "no jsonl_file field" in raised.value.message
    assert "-F jsonl_file=@" in raised.value.message
    assert stored_files(storage.root) == []


def test_non_multipart_request_rejected(storage, settings):
    data = (CASES / "14-bom.jsonl").read_bytes()
    with pytest.raises(ApiError) as raised:
        upload(data, "application/json", storage, settings)
    assert raised.value.status_code == 400
    assert "'application/json'" in raised.value.message
    assert "-F jsonl_file=@" in raised.value.message


def test_multipart_without_boundary_rejected(storage, settings):
    with pytest.raises(ApiError) as raised:
        upload(b"", "multipart/form-data", storage, settings)
    assert raised.value.status_code == 400


def test_two_file_fields_rejected(storage, settings):
    data = (CASES / "14-bom.jsonl").read_bytes()
    body, content_type = multipart(
        files=[("jsonl_file", ("a.jsonl", data)), ("jsonl_file", ("b.jsonl", data))]
    )
    with pytest.raises(ApiError) as raised:
        upload(body, content_type, storage, settings)
    assert raised.value.status_code == 400
    assert "more than one jsonl_file" in raised.value.message
    assert stored_files(storage.root) == []


def test_truncated_body_rejected(storage, settings):
    data = (DATA / "instruction_preference.strings.jsonl").read_bytes()
    body, content_type = multipart(files={"jsonl_file": ("cut.jsonl", data)})
    with pytest.raises(ApiError) as raised:
        upload(body[: len(body) // 2], content_type, storage, settings)
    assert raised.value.status_code == 400
    assert "cut off" in raised.value.message
    assert stored_files(storage.root) == []


def test_malformed_body_rejected(storage, settings):
    content_type = "multipart/form-data; boundary=xyz"
    with pytest.raises(ApiError) as raised:
        upload(b"--abc\r\nnonsense\r\n", content_type, storage, settings)
    assert raised.value.status_code == 400
    assert "not valid multipart/form-data" in raised.value.message


def test_failed_stream_leaves_nothing(storage, settings):
    data = (DATA / "dpo_en_demo.messages.jsonl").read_bytes()
    body, content_type = multipart(files={"jsonl_file": ("pairs.jsonl", data)})

    async def broken_stream():
        yield body[: 1536 * 1024]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        upload(broken_stream(), content_type, storage, settings)
    assert stored_files(storage.root) == []


@pytest.mark.parametrize(
    ("name", "pair_count"),
    [
        ("dpo_en_demo.prompt_messages.jsonl", 300),
        ("instruction_preference.strings.jsonl", 1100),
        ("dpo_zh_demo.messages.jsonl", 300),
    ],
)
def test_real_data_uploads(storage, settings, name, pair_count):
    data = (DATA / name).read_bytes()
    body, content_type = multipart(files={"jsonl_file": (name, data)})
    result = upload(body, content_type, storage, settings)
    assert result.pair_count == pair_count
    assert result.sha256 == hashlib.sha256(data).hexdigest()
