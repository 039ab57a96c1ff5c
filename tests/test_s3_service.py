"""The service on S3 storage: uploads go to the bucket, a worker reads them from it, and
download links are presigned S3 URLs. Runs against moto's S3 server on loopback."""

import json

import pytest
import rundpo
from sqlalchemy import select

from app.db import session_scope
from app.models import Run
from tests.conftest import start_api, stop_process
from tests.test_storage import (  # noqa: F401
    ACCESS_KEY_ID,
    REGION,
    SECRET_ACCESS_KEY,
    bucket,
    s3_client,
    s3_endpoint,
)
from tests.test_supervisor import FAST_PARAMS, service_with_model, write_pairs_file
from tests.tiny_model import tiny_model_dir  # noqa: F401
from worker.supervisor import RunSupervisor


@pytest.fixture
def s3_env(s3_endpoint, bucket):  # noqa: F811
    return {
        "RUNDPO_STORAGE_URL": f"s3://{bucket}/service",
        "RUNDPO_S3_ENDPOINT_URL": s3_endpoint,
        "RUNDPO_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "RUNDPO_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "RUNDPO_S3_REGION": REGION,
    }


def test_run_on_s3_storage(monkeypatch, tmp_path, tiny_model_dir, s3_env, s3_client, bucket):  # noqa: F811
    service = service_with_model(monkeypatch, tmp_path, str(tiny_model_dir), **s3_env)
    server = start_api(service)
    try:
        client = rundpo.RundpoClient(
            api_key=service.create_account(credits=10), base_url=server.api_url
        )
        uploaded = client.upload_file(str(write_pairs_file(tmp_path, 16)))
        keys = [item["Key"] for item in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == [f"service/uploads/{uploaded.file_id}.jsonl"]
        assert not (service.data_dir / "storage").exists()

        response = client.session.post(
            f"{server.api_url}/run_dpo", json={"file_id": uploaded.file_id, **FAST_PARAMS}
        )
        run_name = response.json()["run_name"]

        # A worker on another host shares only the database and the bucket with the API.
        assert RunSupervisor(run_name).execute() == "Complete", (service.data_dir / "runs" / run_name / "run.log").read_text()
        status = client.get_status(run_name)
        assert status["status"] == rundpo.RunStatus.COMPLETED
        url = status["download_url"]
        assert url.startswith(s3_env["RUNDPO_S3_ENDPOINT_URL"])
        assert "Signature" in url or "X-Amz-Signature" in url

        target = rundpo.download_and_extract(url, run_name, cache_dir=tmp_path / "cache")
        assert json.loads((target / "adapter_config.json").read_text())["r"] == 48
        with session_scope() as session:
            run = session.scalar(select(Run).where(Run.name == run_name))
            assert run.adapter_key == f"adapters/{run_name}.zip"
    finally:
        stop_process(server.process)
