"""The dashboard in a real browser (Debian's Chromium through Playwright), on loopback.

Each flow runs at a phone's width and at a desktop's. With RUNDPO_SCREENSHOTS=1 the run
pages are saved as PNG files under docs/screenshots/.
"""

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db import session_scope
from app.events import EventType, add_event
from app.models import Run
from app.runs import set_status
from app.statuses import RunStatus
from tests.conftest import CASES_DIR, DATA_DIR, REPO
from tests.test_worker_e2e import TINY, stack, write_pairs  # noqa: F401  (stack is a fixture)
from tests.tiny_model import tiny_model_dir  # noqa: F401  (a fixture)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORTS = {
    "phone": {"width": 390, "height": 844},
    "desktop": {"width": 1280, "height": 900},
}
SCREENSHOT_DIR = REPO / "docs" / "screenshots"
BAD_FILE = CASES_DIR / "01-empty-response.jsonl"
SMALL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TIMEOUT_MS = 15_000

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM}"),
    pytest.mark.timeout(600),
]


def screenshots_enabled() -> bool:
    return os.environ.get("RUNDPO_SCREENSHOTS") == "1"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(params=list(VIEWPORTS))
def viewport(request) -> str:
    return request.param


def open_page(browser, viewport: str):
    context = browser.new_context(viewport=VIEWPORTS[viewport])
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []

    def on_console(message) -> None:
        # A rejected upload returns 400 on purpose, and Chromium logs that page load.
        if message.type == "error" and "status of 400" not in message.text:
            errors.append(message.text)

    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", on_console)
    return context, page, errors


def small_file(tmp_path: Path, name: str, lines: int = 20) -> Path:
    path = tmp_path / name
    with open(DATA_DIR / "instruction_preference.strings.jsonl") as source:
        path.write_text("".join(source.readline() for _ in range(lines)))
    return path


def assert_fits_width(page, where: str) -> None:
    """Check that the page never scrolls sideways, because wide tables scroll in their own box."""
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1, f"{where} is {overflow} px wider than the viewport"


def sign_in(page, base_url: str, key: str) -> None:
    page.goto(f"{base_url}/dashboard")
    assert page.url.startswith(f"{base_url}/dashboard/sign-in")
    assert page.title().startswith("Sign in")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base_url}/dashboard")
    assert page.get_by_role("heading", level=1).inner_text() == "Overview"


def save_screenshot(page, name: str) -> None:
    if screenshots_enabled():
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / f"{name}.png"), full_page=True)


def test_dashboard_flow(browser, viewport, sqlite_live_api, sqlite_service, tmp_path):
    base_url = sqlite_live_api.base_url
    key = sqlite_service.create_account(credits=100, name=f"browser-{viewport}")
    context, page, errors = open_page(browser, viewport)

    sign_in(page, base_url, key)
    header_display = page.locator(".site-header").evaluate("e => getComputedStyle(e).display")
    assert header_display == "flex", "the stylesheet did not load"
    assert page.locator("#balance").inner_text() == "100"
    assert_fits_width(page, "the overview")

    # A rejected file lists its bad lines, then a good file appears in the list.
    page.get_by_role("link", name="Files").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Files"
    page.get_by_label("JSONL file").set_input_files(str(BAD_FILE))
    page.get_by_role("button", name="Upload").click()
    error = page.locator("#upload-error")
    error.wait_for()
    assert "2 bad lines" in error.inner_text()
    lines = page.locator("#bad-lines tbody tr td:first-child").all_inner_texts()
    assert lines == ["2", "3"]
    assert_fits_width(page, "the files page with a rejected upload")

    page.get_by_label("JSONL file").set_input_files(str(small_file(tmp_path, "good-pairs.jsonl")))
    page.get_by_role("button", name="Upload").click()
    page.locator("#upload-success").wait_for()
    assert "20 preference pairs" in page.locator("#upload-success").inner_text()
    assert "good-pairs.jsonl" in page.locator("#files").inner_text()
    assert page.locator("#upload-error").count() == 0

    # Start a run on the file, then cancel it.
    page.get_by_role("link", name="Runs").click()
    file_option = page.locator("#file-id option", has_text="good-pairs.jsonl")
    page.get_by_label("Preference file").select_option(file_option.get_attribute("value"))
    page.get_by_label("Base model").select_option(SMALL_MODEL)
    page.get_by_label("GPUs").fill("1")
    page.get_by_role("button", name="Start the run").click()
    page.wait_for_url(re.compile(r"/dashboard/runs/\w+$"))
    run_name = page.url.rsplit("/", 1)[1]
    assert page.title().startswith(f"Run {run_name}")
    assert page.locator("#run-status").inner_text() == "Pending"
    assert page.locator("#run-progress").get_attribute("value") == "0.0"
    assert_fits_width(page, "the run page")
    page.get_by_role("button", name="Cancel the run").click()
    page.locator("#failure-reason").wait_for()
    assert page.locator("#run-status").inner_text() == "Failed"
    assert "Cancelled by the user" in page.locator("#failure-reason").inner_text()
    assert page.get_by_role("button", name="Cancel the run").count() == 0

    page.get_by_role("link", name="Overview").click()
    ledger = page.locator("#ledger").inner_text()
    assert "hold" in ledger
    assert "refund" in ledger
    assert run_name in ledger
    assert page.locator("#balance").inner_text() == "100"

    # Create a key, see it once, and revoke it.
    page.get_by_role("link", name="API keys").click()
    page.get_by_role("button", name="Create an API key").click()
    new_key = page.get_by_label("New API key").input_value()
    assert new_key.startswith("rd-")
    prefix = new_key[:11]
    assert_fits_width(page, "the keys page")
    page.get_by_role("button", name=f"Revoke key {prefix}").click()
    page.wait_for_url(f"{base_url}/dashboard/keys")
    assert "revoked" in page.locator(f"#keys tr:has-text('{prefix}')").inner_text()
    assert page.get_by_label("New API key").count() == 0

    # Sign out: the dashboard sends the browser back to the sign-in page.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/dashboard/sign-in"))
    assert "You are signed out" in page.content()
    page.goto(f"{base_url}/dashboard/files")
    assert page.url.startswith(f"{base_url}/dashboard/sign-in")
    assert_fits_width(page, "the sign-in page")

    assert errors == []
    context.close()


def test_run_page_refreshes_live(browser, viewport, sqlite_live_api, sqlite_service, tmp_path):
    base_url = sqlite_live_api.base_url
    key = sqlite_service.create_account(credits=100)
    context, page, errors = open_page(browser, viewport)
    sign_in(page, base_url, key)
    page.get_by_role("link", name="Files").click()
    page.get_by_label("JSONL file").set_input_files(str(small_file(tmp_path, "pairs.jsonl")))
    page.get_by_role("button", name="Upload").click()
    page.locator("#upload-success").wait_for()
    page.get_by_role("link", name="Runs").click()
    page.get_by_label("Base model").select_option(SMALL_MODEL)
    page.get_by_label("GPUs").fill("1")
    page.get_by_role("button", name="Start the run").click()
    page.wait_for_url(re.compile(r"/dashboard/runs/\w+$"))
    run_name = page.url.rsplit("/", 1)[1]
    # A marker that a reload would wipe out.
    page.evaluate("window.notReloaded = true")

    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        set_status(session, run, RunStatus.TRAINING_SFT, percent=0.0)
        for step in range(1, 5):
            metrics = {"phase": "sft", "step": step, "total_steps": 10, "loss": 2.0 / step}
            add_event(session, run, EventType.METRICS, metrics)
        run.step, run.total_steps, run.percent = 4, 10, 40.0

    page.wait_for_function(
        "document.querySelector('#run-status').textContent === 'Training SFT'"
    )
    assert page.locator("#run-progress").get_attribute("value") == "40.0"
    assert page.locator("#run-step").inner_text() == "4 of 10"
    assert page.locator("#chart-loss polyline").count() == 1
    assert page.locator("#chart-reward-accuracy polyline").count() == 0
    assert "Training SFT" in page.locator("#timeline").inner_text()

    with session_scope() as session:
        run = session.scalar(select(Run).where(Run.name == run_name))
        set_status(session, run, RunStatus.TRAINING_DPO, percent=0.0)
        for step in range(1, 4):
            metrics = {
                "phase": "dpo",
                "step": step,
                "total_steps": 3,
                "loss": 0.7 - 0.1 * step,
                "rewards/accuracies": 0.3 * step,
                "rewards/margins": 0.05 * step,
            }
            add_event(session, run, EventType.METRICS, metrics)
        run.step, run.total_steps, run.percent = 3, 3, 100.0
        set_status(session, run, RunStatus.FAILED, failure_reason="CUDA out of memory")

    page.wait_for_function("document.querySelector('#run-status').textContent === 'Failed'")
    assert page.evaluate("window.notReloaded") is True
    assert "CUDA out of memory" in page.locator("#failure-reason").inner_text()
    assert page.locator("#chart-loss polyline").count() == 2
    assert page.locator("#chart-reward-accuracy polyline").count() == 1
    assert page.locator("#chart-reward-margin polyline").count() == 1
    assert page.get_by_role("button", name="Cancel the run").count() == 0
    assert_fits_width(page, "the run page with charts")
    save_screenshot(page, f"run-failed-{viewport}")

    assert errors == []
    context.close()


@pytest.mark.slow
def test_real_run_reaches_complete(browser, stack, tmp_path):  # noqa: F811
    """Start a run on the tiny model from the dashboard and watch a real worker train it."""
    base_url = stack.api.base_url
    key = stack.service.create_account(credits=100)
    context, page, errors = open_page(browser, "desktop")
    sign_in(page, base_url, key)

    page.get_by_role("link", name="Files").click()
    page.get_by_label("JSONL file").set_input_files(str(write_pairs(tmp_path, 48)))
    page.get_by_role("button", name="Upload").click()
    page.locator("#upload-success").wait_for()
    page.get_by_role("link", name="Runs").click()
    page.get_by_label("Base model").select_option(TINY)
    page.get_by_label("GPUs").fill("1")
    page.get_by_label("SFT share of pairs (0–1)").fill("0.25")
    page.get_by_label("SFT epochs").fill("1")
    page.get_by_label("DPO epochs").fill("2")
    page.get_by_label("DPO max length (tokens)").fill("128")
    page.get_by_label("DPO learning rate").fill("0.00005")
    page.get_by_role("button", name="Start the run").click()
    page.wait_for_url(re.compile(r"/dashboard/runs/\w+$"))
    page.evaluate("window.notReloaded = true")

    page.wait_for_function(
        "document.querySelector('#run-status').textContent === 'Training DPO'", timeout=300_000
    )
    save_screenshot(page, "run-training-desktop")
    page.wait_for_function(
        "['Complete', 'Failed'].includes(document.querySelector('#run-status').textContent)",
        timeout=300_000,
    )
    failure = page.locator("#failure-reason")
    assert failure.count() == 0, failure.inner_text()
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#run-progress").get_attribute("value") == "100.0"
    assert page.locator("#chart-loss polyline").count() == 2
    assert page.locator("#chart-reward-accuracy polyline").count() == 1
    assert page.locator("#chart-reward-margin polyline").count() == 1
    link = page.locator("#download-adapter")
    assert link.get_attribute("href").startswith(f"{base_url}/api/v2/download_adapter/")
    with page.expect_download() as download_info:
        link.click()
    assert download_info.value.suggested_filename.endswith(".zip")
    save_screenshot(page, "run-complete-desktop")
    page.set_viewport_size(VIEWPORTS["phone"])
    assert_fits_width(page, "the completed run page")
    save_screenshot(page, "run-complete-phone")

    assert errors == []
    context.close()
