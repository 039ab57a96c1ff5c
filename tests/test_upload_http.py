"""upload_file over HTTP: every rejected input gives a 400 naming its lines, and nothing is
stored or charged; accepted awkward files give the expected pair counts."""

import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import LedgerEntry, PreferenceFile
from tests.conftest import CASES_DIR

GOOD = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}


def line(**changes) -> str:
    return json.dumps({**GOOD, **changes})


def assistant(content) -> list:
    return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]


# Each rejected input is a file whose line 2 is bad; the expected field appears in the error.
REJECTED = {
    "invalid utf-8": (b'{"chosen": "\xff\xfe"}', ""),
    "not a json object": ("[1, 2, 3]", ""),
    "not json": ("{chosen: oops", ""),
    "missing chosen": (json.dumps({"rejected": GOOD["rejected"]}), "chosen"),
    "empty rejected": (line(rejected=[]), "rejected"),
    "empty answer": (line(chosen=assistant("")), "chosen[1].content"),
    "unknown role": (
        line(chosen=[{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]),
        "chosen[0].role",
    ),
    "non-string content": (line(chosen=assistant({"text": "x"})), "chosen[1].content"),
    "image part": (
        line(chosen=assistant([{"type": "image_url", "image_url": "x"}])),
        "chosen[1].content",
    ),
    "last message from the user": (
        line(chosen=[{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]),
        "chosen",
    ),
    "prompts differ": (
        line(rejected=[{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "x"}]),
        "rejected[0]",
    ),
    "score is a string": (line(score_chosen="8.5"), "score_chosen"),
    "score is NaN": ('{"chosen": %s, "rejected": %s, "score_rejected": NaN}'
                     % (json.dumps(GOOD["chosen"]), json.dumps(GOOD["rejected"])), "score_rejected"),
    "score is Infinity": ('{"chosen": %s, "rejected": %s, "score_chosen": Infinity}'
                          % (json.dumps(GOOD["chosen"]), json.dumps(GOOD["rejected"])), "score_chosen"),
}

CASE_REJECTIONS = {
    "01-empty-response.jsonl": [2, 3],
    "02-null-content.jsonl": [2, 3],
    "03-non-string-content.jsonl": [2, 4],
    "04-prompt-differs.jsonl": [2, 3],
    "17-mixed-types.jsonl": [2, 4],
}
CASE_ACCEPTED = {
    "06-prompt-exceeds-max-length.jsonl": 2,
    "14-bom.jsonl": 2,
    "15-trailing-blank-lines-crlf.jsonl": 2,
}


def post(api_url: str, key: str, path: Path) -> httpx.Response:
    with open(path, "rb") as handle:
        return httpx.post(
            f"{api_url}/upload_file",
            headers={"X-API-Key": key},
            files={"jsonl_file": (path.name, handle)},
            timeout=30,
        )


def assert_nothing_stored(service) -> None:
    with session_scope() as session:
        assert session.scalar(select(func.count(PreferenceFile.id))) == 0
        assert session.scalar(select(func.count(LedgerEntry.id)).where(LedgerEntry.kind != "grant")) == 0
    uploads = service.data_dir / "storage" / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_input(sqlite_live_api, sqlite_service, tmp_path, name):
    bad, field = REJECTED[name]
    path = tmp_path / "bad.jsonl"
    bad_bytes = bad if isinstance(bad, bytes) else bad.encode()
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad_bytes + b"\n")
    key = sqlite_service.create_account(credits=5)

    response = post(sqlite_live_api.api_url, key, path)
    assert response.status_code == 400, response.text
    body = response.json()
    assert "line 2" in body["error"]
    assert [item["line"] for item in body["lines"]] == [2]
    assert field in body["error"]
    assert_nothing_stored(sqlite_service)
    balance = httpx.get(f"{sqlite_live_api.api_url}/get_credits", headers={"X-API-Key": key})
    assert balance.json()["credits"] == 5


def test_file_without_pairs(sqlite_live_api, sqlite_service, tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n")
    response = post(sqlite_live_api.api_url, sqlite_service.create_account(), path)
    assert response.status_code == 400
    assert "no" in response.json()["error"].lower()
    assert_nothing_stored(sqlite_service)


@pytest.mark.parametrize("name", sorted(CASE_REJECTIONS))
def test_case_file_rejected(sqlite_live_api, sqlite_service, name):
    response = post(sqlite_live_api.api_url, sqlite_service.create_account(), CASES_DIR / name)
    assert response.status_code == 400, response.text
    expected = CASE_REJECTIONS[name]
    assert [item["line"] for item in response.json()["lines"]] == expected
    for number in expected:
        assert f"line {number}" in response.json()["error"]
    assert_nothing_stored(sqlite_service)


@pytest.mark.parametrize("name", sorted(CASE_ACCEPTED))
def test_case_file_accepted(sqlite_live_api, sqlite_service, name):
    response = post(sqlite_live_api.api_url, sqlite_service.create_account(), CASES_DIR / name)
    assert response.status_code == 200, response.text
    assert response.json()["lineCount"] == CASE_ACCEPTED[name]


def test_upload_too_large(sqlite_service, tmp_path):
    from tests.conftest import start_api, stop_process

    server = start_api(sqlite_service, RUNDPO_MAX_UPLOAD_BYTES="2048")
    try:
        path = tmp_path / "big.jsonl"
        path.write_text((json.dumps(GOOD) + "\n") * 40)
        response = post(server.api_url, sqlite_service.create_account(), path)
        assert response.status_code == 413
        assert "RUNDPO_MAX_UPLOAD_BYTES" in response.json()["error"]
        assert_nothing_stored(sqlite_service)
    finally:
        stop_process(server.process)


def test_missing_field(sqlite_live_api, sqlite_service, tmp_path):
    response = httpx.post(
        f"{sqlite_live_api.api_url}/upload_file",
        headers={"X-API-Key": sqlite_service.create_account()},
        files={"file": ("pairs.jsonl", json.dumps(GOOD).encode())},
    )
    assert response.status_code == 400
    assert "jsonl_file" in response.json()["error"]
