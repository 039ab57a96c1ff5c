"""What the dashboard pages show, read for one account, and the account's own key changes.

Every query here filters on the caller's account, so a page never shows another account's
files, runs, ledger entries or keys.
"""

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import accounts
from app.accounts import Caller
from app.charts import Series, line_chart
from app.errors import not_found
from app.events import EventType, events_of_type
from app.models import Account, ApiKey, LedgerEntry, Run, RunEvent, utcnow
from app.params import RunParams
from app.security import key_prefix
from app.statuses import TERMINAL

logger = logging.getLogger(__name__)

LEDGER_ROWS = 100
RECENT_RUNS = 10
RUNS_PAGE_ROWS = 200

# The run parameters the start form offers; the others keep the API's defaults.
FORM_PARAMETERS = (
    "gpus",
    "sft_num_train_epochs",
    "sft_ratio",
    "sft_learning_rate",
    "dpo_num_train_epochs",
    "dpo_learning_rate",
    "dpo_beta",
    "dpo_max_length",
)

# The charts of the run page: element id, title, axis name, and the metrics key per series.
CHARTS = (
    (
        "chart-loss",
        "Training loss",
        "loss",
        (("SFT loss", "sft", "loss"), ("DPO loss", "dpo", "loss")),
    ),
    (
        "chart-reward-accuracy",
        "DPO reward accuracy",
        "accuracy",
        (("reward accuracy", "dpo", "rewards/accuracies"),),
    ),
    (
        "chart-reward-margin",
        "DPO reward margin",
        "margin",
        (("reward margin", "dpo", "rewards/margins"),),
    ),
)


@dataclass(frozen=True)
class LedgerRow:
    entry: LedgerEntry
    run_name: str | None


def ledger(session: Session, caller: Caller, limit: int = LEDGER_ROWS) -> list[LedgerRow]:
    """Return the account's latest ledger entries, newest first, each with its run's name."""
    rows = session.execute(
        select(LedgerEntry, Run.name)
        .outerjoin(Run, Run.id == LedgerEntry.run_id)
        .where(LedgerEntry.account_id == caller.account_id)
        .order_by(LedgerEntry.id.desc())
        .limit(limit)
    ).all()
    return [LedgerRow(entry, run_name) for entry, run_name in rows]


def active_runs(session: Session, caller: Caller) -> list[Run]:
    """Return the account's runs that have not ended, oldest first."""
    return list(
        session.scalars(
            select(Run)
            .where(
                Run.account_id == caller.account_id,
                Run.status.notin_([status.value for status in TERMINAL]),
            )
            .order_by(Run.id)
        )
    )


def recent_runs(session: Session, caller: Caller, limit: int = RECENT_RUNS) -> list[Run]:
    """Return the account's newest runs, whatever their status."""
    return list(
        session.scalars(
            select(Run)
            .where(Run.account_id == caller.account_id)
            .order_by(Run.id.desc())
            .limit(limit)
        )
    )


def form_defaults() -> dict[str, Any]:
    """Return the API's default of each parameter the start form offers."""
    return {name: RunParams.model_fields[name].default for name in FORM_PARAMETERS}


def status_timeline(session: Session, run: Run) -> list[RunEvent]:
    return events_of_type(session, run, EventType.STATUS)


def messages(session: Session, run: Run) -> list[RunEvent]:
    return events_of_type(session, run, EventType.MESSAGE)


def metric_charts(session: Session, run: Run) -> dict[str, str]:
    """Return the run page's charts as SVG, keyed by their element id."""
    metrics = [event.data for event in events_of_type(session, run, EventType.METRICS)]
    charts = {}
    for chart_id, title, y_label, lines in CHARTS:
        series = [
            Series(
                name,
                [
                    (data.get("step"), data.get(key))
                    for data in metrics
                    if data.get("phase") == phase and key in data
                ],
            )
            for name, phase, key in lines
        ]
        charts[chart_id] = line_chart(series, title=title, y_label=y_label, chart_id=chart_id)
    return charts


def account_keys(session: Session, caller: Caller) -> list[ApiKey]:
    """Return the account's keys, live ones first, newest first within each group."""
    keys = session.scalars(
        select(ApiKey).where(ApiKey.account_id == caller.account_id).order_by(ApiKey.id.desc())
    ).all()
    return sorted(keys, key=lambda key: key.revoked_at is not None)


def create_account_key(session: Session, caller: Caller) -> str:
    """Create a key for the caller's account and return it; the caller commits."""
    account = session.get(Account, caller.account_id)
    key = accounts.create_key(session, account)
    logger.info("account %s created key %s in the dashboard", caller.account_id, key_prefix(key))
    return key


def revoke_account_key(session: Session, caller: Caller, key_id: int) -> ApiKey:
    """Revoke one of the caller's account's live keys, or raise 404; the caller commits."""
    key = session.scalar(
        select(ApiKey).where(
            ApiKey.id == key_id,
            ApiKey.account_id == caller.account_id,
            ApiKey.revoked_at.is_(None),
        )
    )
    if key is None:
        raise not_found(f"Key {key_id} not found among this account's live keys.")
    key.revoked_at = utcnow()
    logger.info("account %s revoked key %s in the dashboard", caller.account_id, key.prefix)
    return key
