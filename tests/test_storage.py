"""Storage backends: the same behaviour on a local directory and on a real S3 server.

The S3 tests talk HTTP to moto's server mode on loopback, so requests go through boto3's
whole stack (signing, multipart, streaming bodies) as they would against MinIO.
"""

import hashlib
import os
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from app.settings import Settings
from app.storage import LocalStorage, Storage, make_storage
from app.storage_s3 import PART_BYTES, S3Storage

ACCESS_KEY_ID = "test-access-key"
SECRET_ACCESS_KEY = "test-secret-key"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_client(s3_endpoint):
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
    )


@pytest.fixture
def bucket(s3_client):
    name = f"rundpo-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


def make_s3_storage(endpoint: str, bucket: str, prefix: str = "runs/dev") -> S3Storage:
    return S3Storage(
        bucket,
        prefix,
        endpoint_url=endpoint,
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
        region=REGION,
    )


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    endpoint = request.getfixturevalue("s3_endpoint")
    return make_s3_storage(endpoint, request.getfixturevalue("bucket"))


def write_object(storage: Storage, key: str, data: bytes, chunk_bytes: int = 1024 * 1024) -> None:
    writer = storage.open_writer(key)
    for start in range(0, len(data), chunk_bytes):
        writer.write(data[start : start + chunk_bytes])
    writer.commit()


def read_object(storage: Storage, key: str) -> bytes:
    with storage.open_reader(key) as reader:
        return reader.read()


def test_small_object_round_trip(storage):
    data = b'{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n' * 100

    write_object(storage, "uploads/file-1.jsonl", data)

    assert storage.exists("uploads/file-1.jsonl")
    assert storage.size("uploads/file-1.jsonl") == len(data)
    assert read_object(storage, "uploads/file-1.jsonl") == data
    assert b"".join(storage.iter_chunks("uploads/file-1.jsonl")) == data


def test_empty_object_round_trip(storage):
    write_object(storage, "uploads/empty.jsonl", b"")

    assert storage.exists("uploads/empty.jsonl")
    assert storage.size("uploads/empty.jsonl") == 0
    assert read_object(storage, "uploads/empty.jsonl") == b""


@pytest.mark.parametrize("size", [PART_BYTES, 2 * PART_BYTES + 12345])
def test_multipart_object_round_trip(storage, size):
    data = os.urandom(size)

    # Odd-sized writes make parts cut across write boundaries.
    write_object(storage, "adapters/run-1.zip", data, chunk_bytes=1_000_003)

    assert storage.size("adapters/run-1.zip") == size
    read_back = read_object(storage, "adapters/run-1.zip")
    assert len(read_back) == size
    assert hashlib.sha256(read_back).digest() == hashlib.sha256(data).digest()


def test_reader_reads_in_chunks(storage):
    data = os.urandom(3 * 1024 * 1024 + 7)
    write_object(storage, "adapters/run-2.zip", data)

    with storage.open_reader("adapters/run-2.zip") as reader:
        first = reader.read(1000)
        rest = reader.read()

    assert first == data[:1000]
    assert first + rest == data


def test_put_file_and_get_file(storage, tmp_path):
    source = tmp_path / "adapter.zip"
    source.write_bytes(os.urandom(100_000))
    target = tmp_path / "copy.zip"

    storage.put_file("adapters/run-3.zip", source)
    storage.get_file("adapters/run-3.zip", target)

    assert target.read_bytes() == source.read_bytes()


def test_object_invisible_before_commit(storage):
    writer = storage.open_writer("uploads/pending.jsonl")
    writer.write(b"x" * 1000)

    assert not storage.exists("uploads/pending.jsonl")

    writer.commit()
    assert storage.exists("uploads/pending.jsonl")


def test_abort_stores_nothing(storage):
    writer = storage.open_writer("uploads/aborted.jsonl")
    writer.write(b"partial line\n")
    writer.abort()
    writer.abort()

    assert not storage.exists("uploads/aborted.jsonl")
    with pytest.raises(FileNotFoundError):
        storage.open_reader("uploads/aborted.jsonl")


def test_abort_after_commit_keeps_object(storage):
    writer = storage.open_writer("uploads/kept.jsonl")
    writer.write(b"line\n")
    writer.commit()
    writer.abort()

    assert read_object(storage, "uploads/kept.jsonl") == b"line\n"


def test_overwrite_replaces_object(storage):
    write_object(storage, "adapters/run-4.zip", b"first version")
    write_object(storage, "adapters/run-4.zip", b"second")

    assert read_object(storage, "adapters/run-4.zip") == b"second"
    assert storage.size("adapters/run-4.zip") == len(b"second")


def test_missing_key_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.open_reader("uploads/missing.jsonl")
    with pytest.raises(FileNotFoundError):
        storage.size("uploads/missing.jsonl")
    assert not storage.exists("uploads/missing.jsonl")


def test_delete_removes_object(storage):
    write_object(storage, "uploads/old.jsonl", b"line\n")

    storage.delete("uploads/old.jsonl")
    storage.delete("uploads/old.jsonl")

    assert not storage.exists("uploads/old.jsonl")


@pytest.mark.parametrize("key", ["../outside.jsonl", "uploads/../../outside.jsonl", "/etc/passwd"])
def test_key_outside_storage_rejected(storage, key):
    with pytest.raises(ValueError):
        storage.open_writer(key)
    with pytest.raises(ValueError):
        storage.exists(key)


def test_local_presigned_url_is_none(tmp_path):
    storage = LocalStorage(tmp_path)
    write_object(storage, "adapters/run-5.zip", b"zip bytes")

    assert storage.presigned_url("adapters/run-5.zip", 600) is None


def test_s3_objects_live_under_prefix(s3_endpoint, s3_client, bucket):
    storage = make_s3_storage(s3_endpoint, bucket, prefix="/tenant/a/")

    write_object(storage, "uploads/file-2.jsonl", b"line\n")

    listed = s3_client.list_objects_v2(Bucket=bucket)
    assert [item["Key"] for item in listed["Contents"]] == ["tenant/a/uploads/file-2.jsonl"]


def test_s3_small_object_is_single_put(s3_endpoint, s3_client, bucket):
    storage = make_s3_storage(s3_endpoint, bucket)
    writer = storage.open_writer("uploads/small.jsonl")

    writer.write(b"a" * (PART_BYTES - 1))

    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    writer.commit()
    assert storage.size("uploads/small.jsonl") == PART_BYTES - 1


def test_s3_parts_sent_before_commit(s3_endpoint, s3_client, bucket):
    storage = make_s3_storage(s3_endpoint, bucket)
    writer = storage.open_writer("adapters/streamed.zip")

    writer.write(b"a" * (PART_BYTES + 1))

    uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [upload["Key"] for upload in uploads] == ["runs/dev/adapters/streamed.zip"]
    parts = s3_client.list_parts(
        Bucket=bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]
    )
    assert [part["Size"] for part in parts["Parts"]] == [PART_BYTES]

    writer.commit()
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert storage.size("adapters/streamed.zip") == PART_BYTES + 1


def test_s3_abort_leaves_no_multipart_upload(s3_endpoint, s3_client, bucket):
    storage = make_s3_storage(s3_endpoint, bucket)
    writer = storage.open_writer("adapters/aborted.zip")
    writer.write(os.urandom(PART_BYTES + 100))

    writer.abort()

    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3_client.list_objects_v2(Bucket=bucket).get("Contents", []) == []


def test_s3_write_after_abort_rejected(s3_endpoint, bucket):
    storage = make_s3_storage(s3_endpoint, bucket)
    writer = storage.open_writer("uploads/closed.jsonl")
    writer.abort()

    with pytest.raises(ValueError):
        writer.write(b"late")


def test_s3_presigned_url_downloads_without_credentials(s3_endpoint, bucket):
    storage = make_s3_storage(s3_endpoint, bucket)
    data = os.urandom(PART_BYTES + 10)
    write_object(storage, "adapters/run-6.zip", data)

    url = storage.presigned_url("adapters/run-6.zip", 600)

    # NOTE: moto does not verify query-string signatures, so this shows that the link needs
    # no credentials from the client, not that MinIO or AWS would accept its signature.
    assert "X-Amz-Signature=" in url
    assert "X-Amz-SignedHeaders=host" in url
    assert ACCESS_KEY_ID in url
    assert SECRET_ACCESS_KEY not in url
    response = httpx.get(url, trust_env=False, timeout=30)
    assert response.status_code == 200
    assert response.content == data
    assert 'filename="run-6.zip"' in response.headers["content-disposition"]


def test_s3_presigned_url_caps_ttl_at_seven_days(s3_endpoint, bucket):
    storage = make_s3_storage(s3_endpoint, bucket)

    url = storage.presigned_url("adapters/run-7.zip", 30 * 24 * 3600)

    assert "X-Amz-Expires=604800" in url


def test_s3_presigned_url_uses_public_endpoint(s3_endpoint, bucket):
    storage = S3Storage(
        bucket,
        endpoint_url=s3_endpoint,
        public_endpoint_url="https://files.example.test",
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
        region=REGION,
    )

    url = storage.presigned_url("adapters/run-8.zip", 600)

    assert url.startswith(f"https://files.example.test/{bucket}/adapters/run-8.zip?")


def test_s3_write_to_missing_bucket_fails(s3_endpoint):
    storage = make_s3_storage(s3_endpoint, f"missing-{uuid.uuid4().hex[:12]}")
    small = storage.open_writer("uploads/small.jsonl")
    large = storage.open_writer("adapters/large.zip")

    small.write(b"line\n")
    with pytest.raises(ClientError):
        small.commit()
    with pytest.raises(ClientError):
        large.write(b"a" * PART_BYTES)
    large.abort()


def test_s3_missing_bucket_rejected():
    with pytest.raises(ValueError):
        S3Storage("")


def settings_for(tmp_path: Path, **values) -> Settings:
    return Settings(data_dir=tmp_path, **values)


def test_make_storage_default_is_local(tmp_path):
    storage = make_storage(settings_for(tmp_path))

    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "storage").resolve()


def test_make_storage_file_url(tmp_path):
    storage = make_storage(settings_for(tmp_path, storage_url=f"file://{tmp_path}/objects"))

    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "objects").resolve()


def test_make_storage_s3_url(tmp_path, s3_endpoint, bucket):
    settings = settings_for(
        tmp_path,
        storage_url=f"s3://{bucket}/rundpo/prod",
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id=ACCESS_KEY_ID,
        s3_secret_access_key=SECRET_ACCESS_KEY,
        s3_region=REGION,
    )

    storage = make_storage(settings)

    assert isinstance(storage, S3Storage)
    assert storage.bucket == bucket
    assert storage.prefix == "rundpo/prod"
    write_object(storage, "uploads/file-3.jsonl", b"line\n")
    assert read_object(storage, "uploads/file-3.jsonl") == b"line\n"


def test_make_storage_s3_url_without_prefix(tmp_path, s3_endpoint, bucket):
    settings = settings_for(tmp_path, storage_url=f"s3://{bucket}", s3_endpoint_url=s3_endpoint)

    storage = make_storage(settings)

    assert isinstance(storage, S3Storage)
    assert storage.prefix == ""


@pytest.mark.parametrize("url", ["ftp://host/path", "gs://bucket/prefix"])
def test_make_storage_unsupported_url_rejected(tmp_path, url):
    with pytest.raises(ValueError, match="RUNDPO_STORAGE_URL"):
        make_storage(settings_for(tmp_path, storage_url=url))
