"""The HTTP API on a live uvicorn server, on SQLite and on PostgreSQL.

Driven by raw HTTP calls equivalent to the reference's curl commands and by the official
`rundpo` 0.2.1 client, sync and async.
"""

import asyncio
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import rundpo
from sqlalchemy import func, select

from app import credits
from app.db import session_scope
from app.models import LedgerEntry, PreferenceFile, Run
from app.statuses import RunStatus
from tests.conftest import DATA_DIR, start_api, stop_process

PAIRS = DATA_DIR / "instruction_preference.strings.jsonl"


def small_file(tmp_path: Path, lines: int = 20) -> Path:
    path = tmp_path / "pairs.jsonl"
    with open(PAIRS) as source:
        path.write_text("".join(source.readline() for _ in range(lines)))
    return path


def headers(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def upload(api_url: str, key: str, path: Path, suffix: str = "") -> httpx.Response:
    with open(path, "rb") as handle:
        return httpx.post(
            f"{api_url}/upload_file{suffix}",
            headers=headers(key),
            files={"jsonl_file": (path.name, handle, "application/octet-stream")},
            timeout=60,
        )


def test_curl_flow(live_api, service, tmp_path):
    key = service.create_account(credits=100)
    api = live_api.api_url

    # curl -X POST .../upload_file -H "X-API-Key: ..." -F "jsonl_file=@training_data.jsonl"
    response = upload(api, key, small_file(tmp_path))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["uploaded"] is True
    assert body["lineCount"] == 20
    assert len(body["file_id"]) == 32
    assert body["file_id"].isalpha()
    file_id = body["file_id"]

    # curl -X POST .../list_files -H "X-API-Key: ..." -H "Content-Type: application/json"
    response = httpx.post(
        f"{api}/list_files", headers={**headers(key), "Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json()["file_ids"] == [file_id]
    assert response.json()["files"][0]["lineCount"] == 20

    # curl -X POST .../run_dpo -H "Content-Type: application/json" -d '{...}'
    response = httpx.post(
        f"{api}/run_dpo",
        headers=headers(key),
        json={
            "file_id": file_id,
            "base_model": "Qwen/Qwen2-0.5B",
            "gpus": 2,
            "sft_learning_rate": 0.0002,
            "dpo_learning_rate": 0.000005,
            "dpo_num_train_epochs": 1,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file_id"] == file_id
    assert body["status"] == "pending"
    run_name = body["run_name"]
    assert run_name.count("_") >= 2

    # curl -G .../get_status --data-urlencode "run_name=..."
    response = httpx.get(f"{api}/get_status", headers=headers(key), params={"run_name": run_name})
    assert response.status_code == 200
    body = response.json()
    assert body["run_name"] == run_name
    assert body["status"] == "Pending"
    assert body["percent"] == 0

    response = httpx.post(f"{api}/get_status", headers=headers(key), json={"run_name": run_name})
    assert response.json()["status"] == "Pending"

    response = httpx.get(f"{api}/get_credits", headers=headers(key))
    assert response.status_code == 200
    assert response.json()["credits"] < 100

    response = httpx.post(f"{api}/cancel_run", headers=headers(key), json={"run_name": run_name})
    assert response.json() == {"success": True}
    body = httpx.get(f"{api}/get_status", headers=headers(key), params={"run_name": run_name}).json()
    assert body["status"] == "Failed"
    assert "cancel" in body["failure_reason"].lower()
    assert "error" not in body
    assert httpx.get(f"{api}/get_credits", headers=headers(key)).json()["credits"] == 100


def test_official_client_sync(live_api, service, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNDPO_API_KEY", service.create_account(credits=100))
    client = rundpo.RundpoClient(base_url=live_api.api_url)

    uploaded = client.upload_file(str(small_file(tmp_path)))
    assert uploaded.uploaded is True
    assert uploaded.line_count == 20
    assert client.list_files() == [uploaded.file_id]
    assert client.get_credits() == 100.0

    config = rundpo.DPOConfig(
        file_id=uploaded.file_id,
        run_config=rundpo.RunConfig(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", gpus=1),
    )
    run_name = client.run_dpo(config)
    status = client.get_status(run_name)
    assert status["status"] == rundpo.RunStatus.PENDING
    assert status["percent"] == 0
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        assert run.enqueued_at is not None, live_api.log()
    assert client.get_credits() < 100.0

    assert client.cancel_run(run_name) is True
    status = client.get_status(run_name)
    assert status["status"] == rundpo.RunStatus.FAILED
    assert client.get_credits() == 100.0


def test_official_client_async(live_api, service, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNDPO_API_KEY", service.create_account(credits=100))
    path = str(small_file(tmp_path))

    async def scenario() -> None:
        async with rundpo.AsyncRundpoClient(base_url=live_api.api_url) as client:
            uploaded = await client.upload_file(path)
            assert uploaded.line_count == 20
            assert await client.list_files() == [uploaded.file_id]
            config = rundpo.DPOConfig(
                file_id=uploaded.file_id,
                run_config=rundpo.RunConfig(base_model="Qwen/Qwen2-0.5B"),
            )
            run_name = await client.run_dpo(config)
            status = await client.get_status(run_name)
            assert status["status"] == rundpo.RunStatus.PENDING
            assert await client.cancel_run(run_name) is True
            assert await client.get_credits() == 100.0

    asyncio.run(scenario())


def test_auth_errors(live_api, service):
    api = live_api.api_url
    response = httpx.get(f"{api}/get_credits")
    assert response.status_code == 401
    assert "X-API-Key" in response.json()["error"]

    response = httpx.get(f"{api}/get_credits", headers=headers("rd-" + "x" * 43))
    assert response.status_code == 401

    key = service.create_account(credits=1)
    assert httpx.get(f"{api}/get_credits.php", headers=headers(key)).status_code == 200

    from app.accounts import revoke_key

    with session_scope() as session:
        revoke_key(session, key[:11])
    response = httpx.get(f"{api}/get_credits.php", headers=headers(key))
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]


def test_other_accounts_get_404(live_api, service, tmp_path):
    api = live_api.api_url
    owner = service.create_account(credits=100)
    stranger = service.create_account(credits=100)
    file_id = upload(api, owner, small_file(tmp_path)).json()["file_id"]
    run_name = httpx.post(
        f"{api}/run_dpo", headers=headers(owner), json={"file_id": file_id}
    ).json()["run_name"]

    assert httpx.post(f"{api}/list_files", headers=headers(stranger)).json()["file_ids"] == []
    response = httpx.post(f"{api}/run_dpo", headers=headers(stranger), json={"file_id": file_id})
    assert response.status_code == 404
    assert file_id in response.json()["error"]
    response = httpx.get(
        f"{api}/get_status", headers=headers(stranger), params={"run_name": run_name}
    )
    assert response.status_code == 404
    response = httpx.post(f"{api}/cancel_run", headers=headers(stranger), json={"run_id": run_name})
    assert response.status_code == 404
    response = httpx.get(
        f"{api}/get_status", headers=headers(owner), params={"run_name": "no_such_run"}
    )
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"sft_learning_rate": 0}, "sft_learning_rate"),
        ({"dpo_learning_rate": 1.5}, "dpo_learning_rate"),
        ({"dpo_num_train_epochs": 0}, "dpo_num_train_epochs"),
        ({"sft_per_device_train_batch_size": 0}, "sft_per_device_train_batch_size"),
        ({"dpo_lora_r": 0}, "dpo_lora_r"),
        ({"gpus": 0}, "gpus"),
        ({"gpus": 99}, "gpus=99"),
        ({"learning_rate": 0.1}, "unknown parameter 'learning_rate'"),
        ({"dpo_learnig_rate": 0.1}, "did you mean 'dpo_learning_rate'?"),
        ({"base_model": "gpt2"}, "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ({"sft_packing": "maybe"}, "sft_packing"),
    ],
)
def test_run_dpo_rejects(sqlite_live_api, sqlite_service, tmp_path, body, expected):
    key = sqlite_service.create_account(credits=100)
    api = sqlite_live_api.api_url
    file_id = upload(api, key, small_file(tmp_path)).json()["file_id"]

    response = httpx.post(f"{api}/run_dpo", headers=headers(key), json={"file_id": file_id, **body})
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]
    with session_scope() as session:
        assert session.scalar(select(func.count(Run.id))) == 0


def test_run_dpo_defaults(sqlite_live_api, sqlite_service, tmp_path):
    key = sqlite_service.create_account(credits=100)
    api = sqlite_live_api.api_url
    file_id = upload(api, key, small_file(tmp_path)).json()["file_id"]

    response = httpx.post(
        f"{api}/run_dpo.php", headers=headers(key), json={"file_id": file_id, "dpo_max_length": None}
    )
    assert response.status_code == 200, response.text
    with session_scope() as session:
        run = session.scalar(select(Run))
        assert run.params["dpo_max_length"] == 256
        assert run.params["sft_ratio"] == 0.05
        assert run.params["sft_num_train_epochs"] == 3
        assert run.params["dpo_beta"] == 0.1
        assert run.params["base_model"] == "Qwen/Qwen2-0.5B"
        assert run.gpus == 2

    response = httpx.post(f"{api}/run_dpo", headers=headers(key), json={})
    assert response.status_code == 400
    assert "file_id" in response.json()["error"]
    response = httpx.post(f"{api}/run_dpo", headers=headers(key), content=b"{not json")
    assert response.status_code == 400


def test_insufficient_credits(sqlite_live_api, sqlite_service, tmp_path):
    key = sqlite_service.create_account(credits=0.000001)
    api = sqlite_live_api.api_url
    file_id = upload(api, key, small_file(tmp_path)).json()["file_id"]
    response = httpx.post(f"{api}/run_dpo", headers=headers(key), json={"file_id": file_id})
    assert response.status_code == 402
    assert "credits" in response.json()["error"]


def test_concurrent_holds_on_postgres(postgres_service, tmp_path):
    server = start_api(postgres_service)
    try:
        key = postgres_service.create_account(credits=1000)
        api = server.api_url
        file_id = upload(api, key, small_file(tmp_path, lines=200)).json()["file_id"]

        with session_scope() as session:
            upload_row = session.get(PreferenceFile, file_id)
            cost = credits.estimate_cost_micro(upload_row.token_estimate, 0.05, 3, 1, 2.0)
            account_id = upload_row.account_id
            granted = credits.balance_micro(session, account_id)
            # Leave exactly enough for three runs and a part of a fourth.
            session.add(
                LedgerEntry(
                    account_id=account_id,
                    kind="grant",
                    amount_micro=3 * cost + cost // 2 - granted,
                    note="test adjustment",
                )
            )
            from app.models import Account

            session.get(Account, account_id).balance_micro = 3 * cost + cost // 2

        def start(_: int) -> int:
            return httpx.post(
                f"{api}/run_dpo", headers=headers(key), json={"file_id": file_id}, timeout=60
            ).status_code

        with ThreadPoolExecutor(max_workers=20) as pool:
            codes = list(pool.map(start, range(20)))
        assert codes.count(200) == 3, codes
        assert codes.count(402) == 17, codes
        with session_scope() as session:
            assert credits.balance_micro(session, account_id) == cost // 2
            assert session.scalar(select(func.count(Run.id))) == 3
    finally:
        stop_process(server.process)


def test_download_link(sqlite_live_api, sqlite_service, tmp_path):
    key = sqlite_service.create_account(credits=100)
    api = sqlite_live_api.api_url
    file_id = upload(api, key, small_file(tmp_path)).json()["file_id"]
    run_name = httpx.post(
        f"{api}/run_dpo", headers=headers(key), json={"file_id": file_id}
    ).json()["run_name"]

    # Stand in for a worker: store an adapter zip and mark the run Complete.
    from app.deps import get_storage
    from app.storage import adapter_key

    zip_path = tmp_path / "adapter.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr(f"{run_name}/adapter_config.json", json.dumps({"r": 48}))
        archive.writestr(f"{run_name}/README.md", "model card")
    get_storage().put_file(adapter_key(run_name), zip_path)
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        run.status = RunStatus.COMPLETE.value
        run.adapter_key = adapter_key(run_name)

    body = httpx.get(f"{api}/get_status", headers=headers(key), params={"run_name": run_name}).json()
    assert body["status"] == "Complete"
    url = body["download_url"]
    assert url.startswith(sqlite_live_api.base_url)

    response = httpx.get(url)  # no API key, as the official client downloads
    assert response.status_code == 200
    assert response.content == zip_path.read_bytes()

    assert httpx.get(url.replace("token=", "token=1")).status_code == 404
    other = url.replace(run_name, "someone_elses_run")
    assert httpx.get(other).status_code == 404
    from app.security import sign_token

    expired = sign_token(b"test-signing-secret", "adapter-download", run_name, -10)
    response = httpx.get(url.split("?")[0], params={"token": expired})
    assert response.status_code == 404

    target = rundpo.download_and_extract(url, run_name, cache_dir=tmp_path / "cache")
    assert json.loads((target / "adapter_config.json").read_text()) == {"r": 48}


def test_healthz_and_docs(sqlite_live_api):
    response = httpx.get(f"{sqlite_live_api.base_url}/healthz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}
    docs = httpx.get(f"{sqlite_live_api.base_url}/docs")
    assert docs.status_code == 200
    # The page works offline: every script and stylesheet comes from this server.
    assert "http://" not in docs.text
    assert "https://" not in docs.text
    script = httpx.get(f"{sqlite_live_api.base_url}/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200
    spec = httpx.get(f"{sqlite_live_api.base_url}/openapi.json").json()
    assert "/api/v2/run_dpo" in spec["paths"]


def test_rate_limit_shared_through_redis(sqlite_service, tmp_path):
    import redis

    from tests.conftest import REDIS_URL

    redis.Redis.from_url(REDIS_URL).flushdb()
    extra = {"RUNDPO_REDIS_URL": REDIS_URL, "RUNDPO_RATE_LIMIT_PER_MINUTE": "4"}
    first = start_api(sqlite_service, **extra)
    second = start_api(sqlite_service, **extra)
    try:
        key = sqlite_service.create_account(credits=1)
        codes = [
            httpx.get(f"{server.api_url}/get_credits", headers=headers(key)).status_code
            for server in (first, second, first, second)
        ]
        assert codes == [200, 200, 200, 200]
        response = httpx.get(f"{first.api_url}/get_credits", headers=headers(key))
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert "Retry after" in response.json()["error"]
    finally:
        stop_process(first.process)
        stop_process(second.process)


def test_get_status_checks_key_in_its_query(live_api, service, tmp_path):
    api = live_api.api_url
    key = service.create_account(credits=100)
    file_id = upload(api, key, small_file(tmp_path)).json()["file_id"]
    run_name = httpx.post(f"{api}/run_dpo", headers=headers(key), json={"file_id": file_id}).json()[
        "run_name"
    ]
    params = {"run_name": run_name}

    assert httpx.get(f"{api}/get_status", headers=headers(key), params=params).status_code == 200
    assert httpx.get(f"{api}/get_status", params=params).status_code == 401
    response = httpx.get(f"{api}/get_status", headers=headers("rd-unknown"), params=params)
    assert response.status_code == 401
    response = httpx.get(f"{api}/get_status", headers=headers("rd-unknown"))
    assert response.status_code == 401
    response = httpx.get(f"{api}/get_status", headers=headers(key))
    assert response.status_code == 400
    assert "run_name" in response.json()["error"]

    from app.accounts import revoke_key

    with session_scope() as session:
        revoke_key(session, key[:11])
    response = httpx.get(f"{api}/get_status", headers=headers(key), params=params)
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]


def test_body_errors_say_what_to_send(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account(credits=1)
    api = sqlite_live_api.api_url
    response = httpx.post(
        f"{api}/run_dpo",
        headers={**headers(key), "Content-Type": "application/json"},
        content=b'{"file_id": ',
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]
    response = httpx.post(f"{api}/run_dpo", headers=headers(key), json=[1, 2])
    assert response.status_code == 400
    assert "JSON object" in response.json()["error"]
