"""The web dashboard under /dashboard: server-rendered pages signed in with an API key."""

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from app import credits, dashboard, files, queue, runs, web_session
from app.accounts import authenticate
from app.deps import SessionDep, SettingsDep, StorageDep
from app.downloads import download_url
from app.errors import ApiError
from app.models import PreferenceFile, Run
from app.params import parse_run_request
from app.statuses import TERMINAL, TRAINING, RunStatus
from app.uploads import receive_upload
from app.web_session import CSRF_FIELD, CsrfError, WebSession

logger = logging.getLogger(__name__)

PREFIX = "/dashboard"
SIGN_IN_PATH = f"{PREFIX}/sign-in"
APP_DIR = Path(__file__).resolve().parent.parent
STATIC_DIR = APP_DIR / "static"

# Fixed notices for the sign-in page, chosen by a query parameter so no text is reflected.
SIGN_IN_NOTICES = {
    "signed-out": "You are signed out.",
    "expired": "Your session ended. Sign in again with an API key.",
    "key-revoked": "You revoked the key you were signed in with, so you are signed out.",
}
CSRF_MESSAGE = (
    "Forbidden: the form's CSRF token is missing or does not match your session. "
    "Reload the page and submit the form again."
)


class SignInRequired(Exception):
    """The request has no valid dashboard session."""


def _format_credits(micro: int | None) -> str:
    if micro is None:
        return "–"
    return f"{credits.to_credits(micro):,.6f}".rstrip("0").rstrip(".")


def _format_time(moment: datetime | None) -> str:
    moment = runs.as_utc(moment)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "–"


def _iso_time(moment: datetime | None) -> str:
    moment = runs.as_utc(moment)
    return moment.isoformat() if moment else ""


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {seconds} s"
    return f"{seconds} s"


def _format_size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} bytes"
    size = float(size_bytes)
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024:
            break
    return f"{size:.1f} {unit}"


templates = Jinja2Templates(directory=APP_DIR / "templates")
templates.env.filters.update(
    credits=_format_credits,
    when=_format_time,
    iso=_iso_time,
    duration=_format_duration,
    size=_format_size,
)
templates.env.globals.update(CSRF_FIELD=CSRF_FIELD)


def _render(
    request: Request,
    name: str,
    context: dict[str, Any],
    status_code: int = 200,
    web: WebSession | None = None,
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, name, {"web": web, **context}, status_code=status_code
    )
    # Pages show account data and, once, new API keys: never keep them in a shared cache.
    response.headers["Cache-Control"] = "no-store"
    return response


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


class DashboardRoute(APIRoute):
    """A route class that sends requests without a session to sign-in and renders errors as HTML."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                if _wants_json(request):
                    return JSONResponse({"error": "Sign in to the dashboard."}, status_code=401)
                # Only a visitor who sent a session cookie has a session that ended.
                if web_session.SESSION_COOKIE in request.cookies:
                    return RedirectResponse(f"{SIGN_IN_PATH}?notice=expired", status_code=303)
                return RedirectResponse(SIGN_IN_PATH, status_code=303)
            except CsrfError:
                logger.warning(
                    "dashboard %s %s rejected: CSRF token missing or invalid",
                    request.method,
                    request.url.path,
                )
                return _render(
                    request, "error.html", {"title": "Forbidden", "message": CSRF_MESSAGE}, 403
                )
            except ApiError as error:
                if _wants_json(request):
                    return JSONResponse({"error": error.message}, status_code=error.status_code)
                return _render(
                    request,
                    "error.html",
                    {"title": "Error", "message": error.message},
                    error.status_code,
                )

        return handle


router = APIRouter(prefix=PREFIX, route_class=DashboardRoute, include_in_schema=False)


def get_web_session(request: Request, session: SessionDep, settings: SettingsDep) -> WebSession:
    cookie = request.cookies.get(web_session.SESSION_COOKIE)
    web = web_session.read_session(session, settings, cookie)
    if web is None:
        raise SignInRequired()
    return web


WebSessionDep = Annotated[WebSession, Depends(get_web_session)]
CsrfField = Annotated[str | None, Form()]


def _sign_in_form(
    request: Request, settings, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    nonce, token = web_session.start_sign_in(settings)
    page = _render(
        request, "sign_in.html", {"title": "Sign in", "sign_in_token": token, **extra}, status_code
    )
    web_session.set_sign_in_cookie(page, request, nonce)
    return page


@router.get("/sign-in")
def sign_in_page(request: Request, settings: SettingsDep, notice: str | None = None) -> Response:
    return _sign_in_form(request, settings, notice=SIGN_IN_NOTICES.get(notice or ""))


@router.post("/sign-in")
def sign_in(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    csrf_token: CsrfField = None,
    api_key: Annotated[str, Form()] = "",
) -> Response:
    web_session.check_sign_in_csrf(settings, request, csrf_token)
    caller = authenticate(session, api_key.strip())
    if caller is None:
        logger.info("dashboard sign-in rejected: invalid or revoked API key")
        error = (
            "The API key is invalid or revoked. Check the key, or ask the administrator of "
            "this server for a new one."
        )
        return _sign_in_form(request, settings, 401, error=error)

    response = RedirectResponse(PREFIX, status_code=303)
    web_session.set_session_cookie(
        response, request, settings, web_session.start_session(settings, caller)
    )
    web_session.clear_sign_in_cookie(response, request)
    return response


@router.post("/sign-out")
def sign_out(
    request: Request, web: WebSessionDep, settings: SettingsDep, csrf_token: CsrfField = None
) -> Response:
    web_session.check_csrf(web, csrf_token)
    web_session.end_session(settings, web)
    response = RedirectResponse(f"{SIGN_IN_PATH}?notice=signed-out", status_code=303)
    web_session.clear_session_cookie(response, request)
    return response


@router.get("")
def overview(request: Request, web: WebSessionDep, session: SessionDep) -> Response:
    caller = web.caller
    context = {
        "title": "Overview",
        "balance_micro": credits.balance_micro(session, caller.account_id),
        "active_runs": dashboard.active_runs(session, caller),
        "recent_runs": dashboard.recent_runs(session, caller),
        "ledger": dashboard.ledger(session, caller),
    }
    return _render(request, "overview.html", context, web=web)


def _files_context(session, web: WebSession, **extra: Any) -> dict[str, Any]:
    return {"title": "Files", "files": files.list_files(session, web.caller), **extra}


@router.get("/files")
def files_page(
    request: Request, web: WebSessionDep, session: SessionDep, uploaded: str | None = None
) -> Response:
    upload = session.get(PreferenceFile, uploaded) if uploaded else None
    if upload is not None and upload.account_id != web.caller.account_id:
        upload = None
    return _render(request, "files.html", _files_context(session, web, uploaded=upload), web=web)


@router.post("/files")
async def upload_file(
    request: Request,
    web: WebSessionDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Response:
    content_type = request.headers.get("content-type", "")
    content_length = request.headers.get("content-length")
    declared_bytes = int(content_length) if content_length and content_length.isdigit() else None
    try:
        result = await receive_upload(
            web_session.require_csrf_field(request.stream(), content_type, web),
            content_type,
            storage,
            settings,
            files.new_file_id(),
            content_length=declared_bytes,
        )
    except ApiError as error:
        context = await run_in_threadpool(
            _files_context,
            session,
            web,
            error=error.message,
            bad_lines=error.extra.get("lines", []),
        )
        return _render(request, "files.html", context, error.status_code, web=web)
    try:
        await run_in_threadpool(files.record_upload, session, web.caller, result)
    except BaseException:
        storage.delete(result.storage_key)
        raise
    return RedirectResponse(f"{PREFIX}/files?uploaded={result.file_id}", status_code=303)


def _runs_context(session, settings, web: WebSession, **extra: Any) -> dict[str, Any]:
    return {
        "title": "Runs",
        "runs": dashboard.recent_runs(session, web.caller, dashboard.RUNS_PAGE_ROWS),
        "files": files.list_files(session, web.caller),
        "models": sorted(settings.model_catalog),
        "form": dashboard.form_defaults(),
        **extra,
    }


@router.get("/runs")
def runs_page(request: Request, web: WebSessionDep, session: SessionDep, settings: SettingsDep):
    return _render(request, "runs.html", _runs_context(session, settings, web), web=web)


def _start_run(session, settings, caller, body: dict[str, Any]) -> Run:
    run = runs.create_run(session, settings, caller, parse_run_request(body))
    session.commit()
    queue.enqueue(session, run)
    return run


@router.post("/runs")
async def start_run(
    request: Request, web: WebSessionDep, session: SessionDep, settings: SettingsDep
) -> Response:
    form = await request.form()
    web_session.check_csrf(web, form.get(CSRF_FIELD))
    body: dict[str, Any] = {"file_id": form.get("file_id") or None}
    for name in ("base_model", *dashboard.FORM_PARAMETERS):
        value = str(form.get(name) or "").strip()
        if value:
            body[name] = value
    try:
        run = await run_in_threadpool(_start_run, session, settings, web.caller, body)
    except ApiError as error:
        session.rollback()
        form_values = {**dashboard.form_defaults(), **body}
        context = await run_in_threadpool(
            _runs_context, session, settings, web, error=error.message, form=form_values
        )
        return _render(request, "runs.html", context, error.status_code, web=web)
    return RedirectResponse(f"{PREFIX}/runs/{run.name}", status_code=303)


def _run_context(session, settings, storage, web: WebSession, run: Run) -> dict[str, Any]:
    status = runs.status_payload(run, download_url(settings, storage, run))
    return {
        "title": f"Run {run.name}",
        "run": run,
        "status": status,
        "training": run.run_status in TRAINING,
        "terminal": run.run_status in TERMINAL,
        "complete": run.run_status == RunStatus.COMPLETE,
        "timeline": dashboard.status_timeline(session, run),
        "messages": dashboard.messages(session, run),
        "charts": dashboard.metric_charts(session, run),
        "chart_titles": [(chart_id, title) for chart_id, title, _, _ in dashboard.CHARTS],
        "web": web,
    }


@router.get("/runs/{run_name}")
def run_page(
    request: Request,
    run_name: str,
    web: WebSessionDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Response:
    run = runs.get_run(session, web.caller, run_name)
    return _render(request, "run.html", _run_context(session, settings, storage, web, run), web=web)


@router.get("/runs/{run_name}/progress")
def run_progress(
    request: Request,
    run_name: str,
    web: WebSessionDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> JSONResponse:
    """Return the run page's changing parts as HTML fragments keyed by element id."""
    run = runs.get_run(session, web.caller, run_name)
    context = _run_context(session, settings, storage, web, run)
    fragments = {
        "run-summary": templates.get_template("_run_summary.html").render(context),
        "run-actions": templates.get_template("_run_actions.html").render(context),
        "timeline": templates.get_template("_timeline.html").render(context),
        **context["charts"],
    }
    body = {
        "status": run.status,
        "percent": round(run.percent, 2),
        "terminal": context["terminal"],
        "fragments": fragments,
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.post("/runs/{run_name}/cancel")
def cancel_run(
    run_name: str, web: WebSessionDep, session: SessionDep, csrf_token: CsrfField = None
) -> Response:
    web_session.check_csrf(web, csrf_token)
    runs.cancel_run(session, web.caller, run_name)
    session.commit()
    return RedirectResponse(f"{PREFIX}/runs/{run_name}", status_code=303)


def _keys_context(session, web: WebSession, **extra: Any) -> dict[str, Any]:
    return {"title": "API keys", "keys": dashboard.account_keys(session, web.caller), **extra}


@router.get("/keys")
def keys_page(request: Request, web: WebSessionDep, session: SessionDep) -> Response:
    return _render(request, "keys.html", _keys_context(session, web), web=web)


@router.post("/keys")
def create_key(
    request: Request, web: WebSessionDep, session: SessionDep, csrf_token: CsrfField = None
) -> Response:
    web_session.check_csrf(web, csrf_token)
    new_key = dashboard.create_account_key(session, web.caller)
    session.commit()
    return _render(request, "keys.html", _keys_context(session, web, new_key=new_key), web=web)


@router.post("/keys/{key_id}/revoke")
def revoke_key(
    request: Request,
    key_id: int,
    web: WebSessionDep,
    session: SessionDep,
    csrf_token: CsrfField = None,
) -> Response:
    web_session.check_csrf(web, csrf_token)
    dashboard.revoke_account_key(session, web.caller, key_id)
    session.commit()
    if key_id == web.caller.key_id:
        response = RedirectResponse(f"{SIGN_IN_PATH}?notice=key-revoked", status_code=303)
        web_session.clear_session_cookie(response, request)
        return response
    return RedirectResponse(f"{PREFIX}/keys", status_code=303)
