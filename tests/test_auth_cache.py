"""The API key cache of get_status: hits, expiry, and revocation within the TTL."""

import time

import httpx
import pytest

from app.accounts import Caller, CallerCache, revoke_key
from app.db import session_scope
from tests.conftest import start_api, stop_process

CALLER = Caller(account_id=1, account_name="alice", key_id=7, key_prefix="rd-AbCdEfGh")


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_cache_hit_within_ttl():
    clock = FakeClock()
    cache = CallerCache(ttl_s=5, clock=clock)
    cache.put("hash-a", CALLER)
    clock.now_s += 4.9
    assert cache.get("hash-a") == CALLER
    assert cache.get("hash-b") is None


def test_cache_entry_expires_after_ttl():
    clock = FakeClock()
    cache = CallerCache(ttl_s=5, clock=clock)
    cache.put("hash-a", CALLER)
    clock.now_s += 5
    assert cache.get("hash-a") is None


def test_cache_disabled_by_zero_ttl():
    cache = CallerCache(ttl_s=0)
    cache.put("hash-a", CALLER)
    assert cache.get("hash-a") is None


def test_full_cache_drops_expired_entries_first():
    clock = FakeClock()
    cache = CallerCache(ttl_s=5, max_entries=2, clock=clock)
    cache.put("old", CALLER)
    clock.now_s += 3
    cache.put("recent", CALLER)
    clock.now_s += 3
    cache.put("new", CALLER)
    assert cache.get("old") is None
    assert cache.get("recent") == CALLER
    assert cache.get("new") == CALLER


def test_full_cache_of_live_entries_is_cleared():
    cache = CallerCache(ttl_s=60, max_entries=2)
    cache.put("first", CALLER)
    cache.put("second", CALLER)
    cache.put("third", CALLER)
    assert cache.get("first") is None
    assert cache.get("second") is None
    assert cache.get("third") == CALLER


def start_run(api_url: str, key: str) -> str:
    files = {"jsonl_file": ("pairs.jsonl", b'{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}\n')}
    response = httpx.post(f"{api_url}/upload_file", headers={"X-API-Key": key}, files=files)
    assert response.status_code == 200, response.text
    response = httpx.post(
        f"{api_url}/run_dpo",
        headers={"X-API-Key": key},
        json={"file_id": response.json()["file_id"]},
    )
    assert response.status_code == 200, response.text
    return response.json()["run_name"]


def get_status(api_url: str, key: str, run_name: str) -> httpx.Response:
    return httpx.get(
        f"{api_url}/get_status", headers={"X-API-Key": key}, params={"run_name": run_name}
    )


@pytest.mark.parametrize("ttl_s", [1.0, 0.0])
def test_revoked_key_rejected_after_ttl(service, ttl_s):
    server = start_api(service, RUNDPO_API_KEY_CACHE_TTL_S=str(ttl_s))
    try:
        key = service.create_account(credits=100)
        run_name = start_run(server.api_url, key)
        assert get_status(server.api_url, key, run_name).status_code == 200

        with session_scope() as session:
            revoke_key(session, key[:11])
        revoked_at = time.monotonic()

        # Endpoints other than get_status do not use the cache.
        response = httpx.get(f"{server.api_url}/get_credits", headers={"X-API-Key": key})
        assert response.status_code == 401

        if ttl_s == 0:
            response = get_status(server.api_url, key, run_name)
            assert response.status_code == 401
            assert "revoked" in response.json()["error"]
            return

        # Every worker may hold an entry made before the revocation, so wait out the TTL.
        time.sleep(max(0.0, revoked_at + ttl_s + 0.2 - time.monotonic()))
        response = get_status(server.api_url, key, run_name)
        assert response.status_code == 401
        assert "revoked" in response.json()["error"]
    finally:
        stop_process(server.process)


def test_cached_key_still_gets_404_for_other_runs(service):
    server = start_api(service)
    try:
        owner = service.create_account(credits=100)
        stranger = service.create_account(credits=100)
        run_name = start_run(server.api_url, owner)
        assert get_status(server.api_url, stranger, "no_such_run").status_code == 404
        assert get_status(server.api_url, stranger, run_name).status_code == 404
        assert get_status(server.api_url, owner, run_name).status_code == 200
    finally:
        stop_process(server.process)
