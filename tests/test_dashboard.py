"""The web dashboard over HTTP on a live server: sessions, CSRF, isolation, forms and pages."""

import re
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app import charts, credits
from app.accounts import revoke_key
from app.db import session_scope
from app.events import EventType, add_event
from app.models import ApiKey, LedgerEntry, Run
from app.params import RunParams
from app.runs import set_status
from app.settings import get_settings
from app.statuses import RunStatus
from app.storage import adapter_key, make_storage
from tests.conftest import CASES_DIR, DATA_DIR

pytestmark = pytest.mark.timeout(180)

PAIRS = DATA_DIR / "instruction_preference.strings.jsonl"
BAD_FILE = CASES_DIR / "01-empty-response.jsonl"
SMALL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CSRF_PATTERN = re.compile(r'name="csrf_token" value="([^"]+)"')


class PageParser(HTMLParser):
    """Collect a page's title, headings, form controls and labels."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.headings: dict[str, list[str]] = {"h1": [], "h2": []}
        self.controls: list[dict[str, str]] = []
        self.label_targets: set[str] = set()
        self._capture: str | None = None
        self._text: list[str] = []
        self._label_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag in ("title", "h1", "h2"):
            self._capture, self._text = tag, []
        elif tag == "label":
            self._label_depth += 1
            if "for" in attributes:
                self.label_targets.add(attributes["for"])
        elif tag in ("input", "select", "textarea"):
            attributes["tag"] = tag
            attributes["inside_label"] = "yes" if self._label_depth else ""
            self.controls.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._label_depth -= 1
        elif tag == self._capture:
            text = " ".join("".join(self._text).split())
            if tag == "title":
                # The first <title> belongs to the page, and charts' SVG titles come later.
                self.title = self.title or text
            else:
                self.headings[tag].append(text)
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture:
            self._text.append(data)


def parse(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


def csrf_token(html: str) -> str:
    match = CSRF_PATTERN.search(html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def sign_in(base_url: str, key: str, **headers: str) -> httpx.Client:
    """Return a client signed in to the dashboard with `key`."""
    client = httpx.Client(base_url=base_url, timeout=30, headers=headers)
    form = client.get("/dashboard/sign-in")
    assert form.status_code == 200
    response = client.post(
        "/dashboard/sign-in", data={"csrf_token": csrf_token(form.text), "api_key": key}
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/dashboard"
    return client


def page_token(client: httpx.Client, path: str = "/dashboard") -> str:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return csrf_token(response.text)


def upload(client: httpx.Client, path: Path, name: str | None = None, token: str | None = None):
    data = {} if token is None else {"csrf_token": token}
    with open(path, "rb") as handle:
        return client.post(
            "/dashboard/files",
            data=data,
            files={"jsonl_file": (name or path.name, handle, "application/octet-stream")},
        )


def small_file(tmp_path: Path, name: str = "pairs.jsonl", lines: int = 20) -> Path:
    path = tmp_path / name
    with open(PAIRS) as source:
        path.write_text("".join(source.readline() for _ in range(lines)))
    return path


def start_run(client: httpx.Client, file_id: str, **fields: str) -> httpx.Response:
    data = {
        "csrf_token": page_token(client, "/dashboard/runs"),
        "file_id": file_id,
        "base_model": SMALL_MODEL,
        "gpus": "1",
        **fields,
    }
    return client.post("/dashboard/runs", data=data)


def uploaded_file_id(client: httpx.Client, path: Path, name: str) -> str:
    response = upload(client, path, name, page_token(client, "/dashboard/files"))
    assert response.status_code == 303, response.text
    return response.headers["location"].rsplit("=", 1)[1]


def cookie_attributes(response: httpx.Response, name: str) -> list[str]:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return [part.strip().lower() for part in header.split(";")]
    raise AssertionError(f"no Set-Cookie for {name}: {response.headers.get_list('set-cookie')}")


def account_pages(client: httpx.Client) -> str:
    return "".join(
        client.get(path).text
        for path in ("/dashboard", "/dashboard/files", "/dashboard/runs", "/dashboard/keys")
    )


def test_sign_in_cookie_flags(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account(name="alice")
    client = httpx.Client(base_url=sqlite_live_api.base_url, timeout=30)
    form = client.get("/dashboard/sign-in")
    sign_in_cookie = cookie_attributes(form, "rundpo_sign_in")
    assert "httponly" in sign_in_cookie
    assert "samesite=strict" in sign_in_cookie

    response = client.post(
        "/dashboard/sign-in", data={"csrf_token": csrf_token(form.text), "api_key": key}
    )

    assert response.status_code == 303
    attributes = cookie_attributes(response, "rundpo_session")
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/dashboard" in attributes
    assert "max-age=43200" in attributes
    assert "secure" not in attributes  # plain HTTP on loopback
    session_cookie = client.cookies["rundpo_session"]
    assert key not in session_cookie
    assert key[3:20] not in session_cookie
    overview = client.get("/dashboard")
    assert overview.status_code == 200
    assert "alice" in overview.text


def test_secure_cookie_behind_https_proxy(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    client = httpx.Client(
        base_url=sqlite_live_api.base_url, timeout=30, headers={"X-Forwarded-Proto": "https"}
    )
    form = client.get("/dashboard/sign-in")
    assert "secure" in cookie_attributes(form, "rundpo_sign_in")
    # httpx keeps Secure cookies to HTTPS, so send the sign-in cookie by hand.
    nonce = form.headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
    response = client.post(
        "/dashboard/sign-in",
        data={"csrf_token": csrf_token(form.text), "api_key": key},
        headers={"Cookie": f"rundpo_sign_in={nonce}"},
    )
    assert response.status_code == 303
    assert "secure" in cookie_attributes(response, "rundpo_session")


def test_sign_in_rejects_bad_key(sqlite_live_api, sqlite_service):
    sqlite_service.create_account()
    client = httpx.Client(base_url=sqlite_live_api.base_url, timeout=30)
    form = client.get("/dashboard/sign-in")

    response = client.post(
        "/dashboard/sign-in", data={"csrf_token": csrf_token(form.text), "api_key": "rd-wrong"}
    )

    assert response.status_code == 401
    assert "invalid or revoked" in response.text
    assert "rundpo_session" not in client.cookies
    assert client.get("/dashboard").status_code == 303


def test_sign_in_form_needs_token(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    client = httpx.Client(base_url=sqlite_live_api.base_url, timeout=30)
    client.get("/dashboard/sign-in")

    response = client.post("/dashboard/sign-in", data={"api_key": key})

    assert response.status_code == 403
    assert "CSRF token is missing or does not match" in response.text
    assert "rundpo_session" not in client.cookies


def test_pages_need_sign_in(sqlite_live_api, sqlite_service):
    client = httpx.Client(base_url=sqlite_live_api.base_url, timeout=30)
    for path in ("/dashboard", "/dashboard/files", "/dashboard/runs", "/dashboard/keys"):
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/dashboard/sign-in")
    progress = client.get(
        "/dashboard/runs/some_run/progress", headers={"Accept": "application/json"}
    )
    assert progress.status_code == 401
    forged = client.get("/dashboard", cookies={"rundpo_session": "1.abc.9999999999.forged"})
    assert forged.status_code == 303


def test_accounts_see_only_their_data(live_api, service, tmp_path):
    alice_key = service.create_account(credits=100, name="alice-account")
    bob_key = service.create_account(credits=100, name="bob-account")
    alice = sign_in(live_api.base_url, alice_key)
    bob = sign_in(live_api.base_url, bob_key)
    alice_file = uploaded_file_id(alice, small_file(tmp_path), "alice-pairs.jsonl")
    bob_file = uploaded_file_id(bob, small_file(tmp_path), "bob-pairs.jsonl")
    alice_run = start_run(alice, alice_file).headers["location"].rsplit("/", 1)[1]
    bob_run = start_run(bob, bob_file).headers["location"].rsplit("/", 1)[1]
    with session_scope() as session:
        bob_key_id = session.scalar(select(Run.account_id).where(Run.name == bob_run))
        bob_key_id = session.scalar(select(ApiKey.id).where(ApiKey.account_id == bob_key_id))

    alice_pages = account_pages(alice)
    bob_pages = account_pages(bob)

    assert "alice-pairs.jsonl" in alice_pages
    assert alice_run in alice_pages
    assert "bob-pairs.jsonl" not in alice_pages
    assert bob_file not in alice_pages
    assert bob_run not in alice_pages  # neither in the runs nor in the ledger
    assert "bob-account" not in alice_pages
    assert bob_key[:11] not in alice_pages
    assert "alice-pairs.jsonl" not in bob_pages
    assert alice_run not in bob_pages

    token = page_token(alice)
    assert alice.get(f"/dashboard/runs/{bob_run}").status_code == 404
    progress = alice.get(
        f"/dashboard/runs/{bob_run}/progress", headers={"Accept": "application/json"}
    )
    assert progress.status_code == 404
    assert bob_run not in alice.get(f"/dashboard/files?uploaded={bob_file}").text
    cancel = alice.post(f"/dashboard/runs/{bob_run}/cancel", data={"csrf_token": token})
    assert cancel.status_code == 404
    revoke = alice.post(f"/dashboard/keys/{bob_key_id}/revoke", data={"csrf_token": token})
    assert revoke.status_code == 404
    foreign_run = start_run(alice, bob_file)
    assert foreign_run.status_code == 404
    assert "not found" in foreign_run.text

    with session_scope() as session:
        assert session.scalar(select(Run.status).where(Run.name == bob_run)) == "Pending"
        revoked_at = session.scalar(select(ApiKey.revoked_at).where(ApiKey.id == bob_key_id))
        assert revoked_at is None
    assert bob.get("/dashboard").status_code == 200


@pytest.mark.parametrize(
    "action",
    ["sign-out", "create-key", "revoke-key", "cancel-run", "start-run", "upload"],
)
def test_form_without_csrf_rejected(sqlite_live_api, sqlite_service, tmp_path, action):
    key = sqlite_service.create_account(credits=100)
    client = sign_in(sqlite_live_api.base_url, key)
    file_id = uploaded_file_id(client, small_file(tmp_path), "pairs.jsonl")
    run_name = start_run(client, file_id).headers["location"].rsplit("/", 1)[1]
    with session_scope() as session:
        key_id = session.scalar(select(ApiKey.id))
    other = sign_in(sqlite_live_api.base_url, key)
    tokens = {"missing": None, "other session": page_token(other), "wrong": "1.abc"}

    for label, token in tokens.items():
        data = {} if token is None else {"csrf_token": token}
        if action == "sign-out":
            response = client.post("/dashboard/sign-out", data=data)
        elif action == "create-key":
            response = client.post("/dashboard/keys", data=data)
        elif action == "revoke-key":
            response = client.post(f"/dashboard/keys/{key_id}/revoke", data=data)
        elif action == "cancel-run":
            response = client.post(f"/dashboard/runs/{run_name}/cancel", data=data)
        elif action == "start-run":
            response = client.post(
                "/dashboard/runs", data={**data, "file_id": file_id, "base_model": SMALL_MODEL}
            )
        else:
            response = upload(client, small_file(tmp_path), "second.jsonl", token)

        assert response.status_code == 403, (label, response.text)
        assert "CSRF token is missing or does not match your session" in response.text, label

    assert client.get("/dashboard").status_code == 200
    with session_scope() as session:
        assert session.scalar(select(func.count(ApiKey.id))) == 1
        assert session.scalar(select(ApiKey.revoked_at)) is None
        assert session.scalar(select(func.count(Run.id))) == 1
        assert session.scalar(select(Run.status)) == "Pending"
    assert "second.jsonl" not in client.get("/dashboard/files").text


def test_sign_out_ends_session(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    client = sign_in(sqlite_live_api.base_url, key)
    stolen_cookie = client.cookies["rundpo_session"]

    response = client.post("/dashboard/sign-out", data={"csrf_token": page_token(client)})

    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/sign-in?notice=signed-out"
    assert "max-age=0" in cookie_attributes(response, "rundpo_session")
    assert "rundpo_session" not in client.cookies
    assert client.get("/dashboard").status_code == 303
    assert "You are signed out" in client.get(response.headers["location"]).text
    # The old cookie value no longer works either, even if someone kept a copy.
    replay = httpx.get(
        f"{sqlite_live_api.base_url}/dashboard", cookies={"rundpo_session": stolen_cookie}
    )
    assert replay.status_code == 303
    # Signing in again starts a new session.
    assert sign_in(sqlite_live_api.base_url, key).get("/dashboard").status_code == 200


def test_revoked_key_ends_sessions(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    client = sign_in(sqlite_live_api.base_url, key)
    second_browser = sign_in(sqlite_live_api.base_url, key)
    assert client.get("/dashboard").status_code == 200

    with session_scope() as session:
        revoke_key(session, key[:11])

    for browser in (client, second_browser):
        response = browser.get("/dashboard/runs")
        assert response.status_code == 303
        assert response.headers["location"].startswith("/dashboard/sign-in")


def test_keys_create_list_revoke(sqlite_live_api, sqlite_service):
    key = sqlite_service.create_account()
    api = sqlite_live_api.api_url
    client = sign_in(sqlite_live_api.base_url, key)

    token = page_token(client, "/dashboard/keys")
    created = client.post("/dashboard/keys", data={"csrf_token": token})

    assert created.status_code == 200
    assert created.headers["cache-control"] == "no-store"
    new_key = re.search(r'id="new-key" value="(rd-[^"]+)"', created.text).group(1)
    assert httpx.get(f"{api}/get_credits", headers={"X-API-Key": new_key}).status_code == 200
    listing = client.get("/dashboard/keys").text
    assert new_key not in listing  # shown once only
    assert new_key[:11] in listing
    assert key[:11] in listing
    assert "this session" in listing

    with session_scope() as session:
        new_key_id = session.scalar(select(ApiKey.id).where(ApiKey.prefix == new_key[:11]))
    revoked = client.post(
        f"/dashboard/keys/{new_key_id}/revoke",
        data={"csrf_token": page_token(client, "/dashboard/keys")},
    )

    assert revoked.status_code == 303
    assert revoked.headers["location"] == "/dashboard/keys"
    assert httpx.get(f"{api}/get_credits", headers={"X-API-Key": new_key}).status_code == 401
    assert "revoked" in client.get("/dashboard/keys").text

    # Revoking the key of this session signs this browser out.
    with session_scope() as session:
        own_key_id = session.scalar(select(ApiKey.id).where(ApiKey.prefix == key[:11]))
    own = client.post(
        f"/dashboard/keys/{own_key_id}/revoke",
        data={"csrf_token": page_token(client, "/dashboard/keys")},
    )
    assert own.status_code == 303
    assert own.headers["location"] == "/dashboard/sign-in?notice=key-revoked"
    assert client.get("/dashboard/keys").status_code == 303


def test_upload_bad_file_shows_lines(sqlite_live_api, sqlite_service, tmp_path):
    key = sqlite_service.create_account()
    client = sign_in(sqlite_live_api.base_url, key)

    response = upload(client, BAD_FILE, token=page_token(client, "/dashboard/files"))

    assert response.status_code == 400
    table = response.text.split('id="bad-lines"', 1)[1].split("</table>", 1)[0]
    lines = re.findall(r'<td class="number">(\d+)</td><td><code>([^<]*)</code></td>', table)
    assert [line for line, _ in lines] == ["2", "3"]
    assert lines[0][1].startswith("chosen")
    assert lines[1][1].startswith("rejected")
    assert "Invalid preference file: 2 bad lines" in response.text
    assert BAD_FILE.name not in client.get("/dashboard/files").text

    good = upload(client, small_file(tmp_path), token=page_token(client, "/dashboard/files"))
    assert good.status_code == 303
    listing = client.get(good.headers["location"]).text
    assert 'id="upload-success"' in listing
    assert "20 preference pairs" in listing
    files_table = listing.split('id="files"', 1)[1]
    assert "pairs.jsonl" in files_table
    assert '<td class="number">20</td>' in files_table


def test_start_run_and_cancel(sqlite_live_api, sqlite_service, tmp_path):
    key = sqlite_service.create_account(credits=100)
    client = sign_in(sqlite_live_api.base_url, key)
    file_id = uploaded_file_id(client, small_file(tmp_path), "pairs.jsonl")

    form = client.get("/dashboard/runs").text
    defaults = RunParams()
    for name in ("sft_learning_rate", "dpo_learning_rate", "dpo_beta", "sft_ratio"):
        value = re.search(rf'name="{name}" [^>]*value="([^"]+)"', form).group(1)
        assert float(value) == getattr(defaults, name), name
    for model in get_settings().model_catalog:
        assert f'<option value="{model}"' in form

    rejected = start_run(client, file_id, sft_ratio="5")
    assert rejected.status_code == 400
    assert "sft_ratio=&#39;5&#39;" in rejected.text or "sft_ratio" in rejected.text
    assert 'value="5"' in rejected.text  # the form keeps what was typed

    response = start_run(client, file_id, dpo_beta="0.2")
    assert response.status_code == 303
    run_path = response.headers["location"]
    run_name = run_path.rsplit("/", 1)[1]
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        assert run.params["dpo_beta"] == 0.2
        assert run.params["gpus"] == 1
        assert run.base_model == SMALL_MODEL

    page = client.get(run_path).text
    for element in ('id="run-progress"', 'id="run-status"', 'id="chart-loss"',
                    'id="chart-reward-accuracy"', 'id="chart-reward-margin"', 'id="cancel-run"',
                    'id="timeline"'):
        assert element in page, element
    assert "Pending" in page
    overview = client.get("/dashboard").text
    assert run_name in overview.split('id="ledger"', 1)[1]
    assert "hold for run" in overview

    cancelled = client.post(f"{run_path}/cancel", data={"csrf_token": page_token(client, run_path)})
    assert cancelled.status_code == 303
    page = client.get(run_path).text
    assert 'id="failure-reason"' in page
    assert "Cancelled by the user" in page
    assert 'id="cancel-run"' not in page
    ledger = client.get("/dashboard").text.split('id="ledger"', 1)[1]
    assert "ledger-refund" in ledger
    again = client.post(f"{run_path}/cancel", data={"csrf_token": page_token(client, run_path)})
    assert again.status_code == 400
    assert "already ended" in again.text


def test_run_page_progress_and_charts(sqlite_live_api, sqlite_service, tmp_path):
    key = sqlite_service.create_account(credits=100)
    client = sign_in(sqlite_live_api.base_url, key)
    file_id = uploaded_file_id(client, small_file(tmp_path), "pairs.jsonl")
    run_path = start_run(client, file_id).headers["location"]
    run_name = run_path.rsplit("/", 1)[1]
    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        for status in (RunStatus.PROVISIONING_GPUS, RunStatus.TRAINING_SFT):
            set_status(session, run, status, percent=0.0)
        for step in (1, 2, 3):
            metrics = {"phase": "sft", "step": step, "loss": 3.0 - step}
            add_event(session, run, EventType.METRICS, metrics)
        set_status(session, run, RunStatus.TRAINING_DPO, percent=0.0)
        for step in (1, 2):
            add_event(
                session,
                run,
                EventType.METRICS,
                {"phase": "dpo", "step": step, "loss": 0.7, "rewards/accuracies": 0.5 * step,
                 "rewards/margins": 0.1 * step},
            )
        run.step, run.total_steps, run.percent = 2, 4, 50.0

    progress = client.get(f"{run_path}/progress", headers={"Accept": "application/json"})

    assert progress.status_code == 200
    body = progress.json()
    assert body["status"] == "Training DPO"
    assert body["percent"] == 50.0
    assert body["terminal"] is False
    fragments = body["fragments"]
    assert 'value="50.0"' in fragments["run-summary"]
    assert "2 of 4" in fragments["run-summary"]
    assert fragments["timeline"].count("<li") == 4
    assert fragments["chart-loss"].count("<polyline") == 2
    assert fragments["chart-reward-accuracy"].count("<polyline") == 1
    assert fragments["chart-reward-margin"].count("<polyline") == 1
    page = client.get(run_path).text
    assert "<svg" in page.split('id="chart-loss"', 1)[1]
    assert "SFT loss" in page
    assert "DPO reward accuracy" in page

    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        storage = make_storage(get_settings())
        archive = tmp_path / "adapter.zip"
        with zipfile.ZipFile(archive, "w") as handle:
            handle.writestr(f"{run_name}/adapter_config.json", "{}")
        run.adapter_key = adapter_key(run_name)
        storage.put_file(run.adapter_key, archive)
        set_status(session, run, RunStatus.SAVING_MODEL)
        credits.settle(session, run, 1000, run.price_per_million_tokens)
        set_status(session, run, RunStatus.COMPLETE)

    done = client.get(f"{run_path}/progress", headers={"Accept": "application/json"}).json()
    assert done["terminal"] is True
    assert done["status"] == "Complete"
    link = re.search(r'id="download-adapter" href="([^"]+)"', done["fragments"]["run-actions"])
    assert link
    download = httpx.get(link.group(1).replace("&amp;", "&"))
    assert download.status_code == 200
    assert download.content == archive.read_bytes()
    assert 'id="cancel-run"' not in done["fragments"]["run-actions"]
    with session_scope() as session:
        settlement = session.scalar(
            select(func.count(LedgerEntry.id)).where(LedgerEntry.kind == "settlement")
        )
    assert settlement == 1
    assert "ledger-settlement" in client.get("/dashboard").text


def test_pages_have_titles_and_labels(sqlite_live_api, sqlite_service, tmp_path):
    key = sqlite_service.create_account(credits=100)
    client = sign_in(sqlite_live_api.base_url, key)
    file_id = uploaded_file_id(client, small_file(tmp_path), "pairs.jsonl")
    run_path = start_run(client, file_id).headers["location"]
    created = client.post("/dashboard/keys", data={"csrf_token": page_token(client)})
    signed_out = httpx.get(f"{sqlite_live_api.base_url}/dashboard/sign-in")
    bad_upload = upload(client, BAD_FILE, token=page_token(client, "/dashboard/files"))

    pages = {
        "Sign in": signed_out.text,
        "Overview": client.get("/dashboard").text,
        "Files": client.get("/dashboard/files").text,
        "Files (rejected upload)": bad_upload.text,
        "Runs": client.get("/dashboard/runs").text,
        "Run": client.get(run_path).text,
        "API keys": client.get("/dashboard/keys").text,
        "API keys (new key)": created.text,
    }
    for name, html in pages.items():
        page = parse(html)
        assert page.title.endswith("rundpo-server dashboard"), name
        assert len(page.headings["h1"]) == 1, name
        heading = page.headings["h1"][0]
        where = page.title.split(" · ")[0]
        assert where.startswith(name.split(" (")[0]), (name, page.title)
        assert heading.startswith(where), (name, page.title, heading)
        for control in page.controls:
            if control.get("type") in ("hidden", "submit"):
                continue
            labelled = (
                control.get("id") in page.label_targets
                or control.get("aria-label")
                or control["inside_label"]
            )
            assert labelled, (name, control)
        assert 'name="viewport"' in html, name


def test_static_files_served(sqlite_live_api):
    for name, media_type in (("dashboard.css", "text/css"), ("dashboard.js", "javascript")):
        response = httpx.get(f"{sqlite_live_api.base_url}/dashboard/static/{name}")
        assert response.status_code == 200
        assert media_type in response.headers["content-type"]


def test_line_chart_svg():
    svg = charts.line_chart(
        [charts.Series("SFT loss", [(1, 2.0), (2, 1.5), (3, float("nan")), (4, 1.0)]),
         charts.Series("DPO loss", [(1, 0.7)])],
        title="Training <loss>",
        y_label="loss",
        chart_id="chart-loss",
    )

    assert svg.startswith("<svg")
    assert svg.endswith("</svg>")
    assert "Training &lt;loss&gt;" in svg
    assert svg.count("<polyline") == 2
    first_line = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(first_line) == 3  # the NaN point is left out
    xs = [float(point.split(",")[0]) for point in first_line]
    ys = [float(point.split(",")[1]) for point in first_line]
    assert xs == sorted(xs)
    assert ys == sorted(ys)  # falling loss, so rising SVG y
    assert ">step</text>" in svg
    assert ">loss</text>" in svg
    assert "SFT loss" in svg
    assert "DPO loss" in svg

    empty = charts.line_chart([charts.Series("loss", [])], title="Loss", y_label="loss")
    assert "No data yet" in empty
    assert "<polyline" not in empty


def test_line_chart_thins_long_series():
    points = [(step, 1.0 / step) for step in range(1, 5001)]
    svg = charts.line_chart([charts.Series("loss", points)], title="Loss", y_label="loss")
    coordinates = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(coordinates) == charts.MAX_POINTS
    assert charts.nice_ticks(0, 1) == [0, 0.5, 1.0]
    assert charts.nice_ticks(3, 3)[0] < 3 < charts.nice_ticks(3, 3)[-1]
