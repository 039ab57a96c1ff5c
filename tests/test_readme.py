"""Every curl example of the README, run against a live server."""

import json
import os
import re
import subprocess

from tests.conftest import REPO

BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def curl_examples() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block for block in BLOCK.findall(text) if block.lstrip().startswith("curl")]


def test_readme_curl_examples(sqlite_live_api, sqlite_service):
    examples = curl_examples()
    assert len(examples) == 7
    env = {
        **os.environ,
        "BASE": sqlite_live_api.api_url,
        "RUNDPO_API_KEY": sqlite_service.create_account(credits=1000),
    }
    answers = []
    for example in examples:
        result = subprocess.run(
            ["bash", "-c", example.rstrip().replace("\\\n", " ") + " --silent --show-error --fail-with-body"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (example, result.stdout, result.stderr)
        body = json.loads(result.stdout)
        answers.append(body)
        if "file_id" in body and "FILE_ID" not in env:
            env["FILE_ID"] = body["file_id"]
        if "run_name" in body:
            env["RUN_NAME"] = body["run_name"]

    upload, listing, run, status, balance, cancel, events = answers
    assert upload["uploaded"] is True
    assert upload["lineCount"] == 1100
    assert listing["file_ids"] == [upload["file_id"]]
    assert run["status"] == "pending"
    assert status["run_name"] == run["run_name"]
    assert status["status"] == "Pending"
    assert [event["data"]["status"] for event in events["events"]] == ["Pending", "Failed"]
    assert events["has_more"] is False
    assert isinstance(balance["credits"], float)
    assert cancel == {"success": True}
