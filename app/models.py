"""SQLAlchemy 2 models: accounts, API keys, the credit ledger, files, runs, workers, events."""

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.statuses import RunStatus


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (CheckConstraint("balance_micro >= 0", name="ck_accounts_balance"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # The sum of the account's ledger entries, kept in the same transaction as each entry so
    # that a hold can check and take credits in one conditional UPDATE.
    balance_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    keys: Mapped[list["ApiKey"]] = relationship(back_populates="account")


class ApiKey(Base):
    """An API key, stored only as the SHA-256 of the key; the prefix identifies it to people."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    account: Mapped[Account] = relationship(back_populates="keys")


class LedgerKind(str, Enum):
    GRANT = "grant"
    HOLD = "hold"
    SETTLEMENT = "settlement"
    REFUND = "refund"


class LedgerEntry(Base):
    """One movement of credits, in micro-credits (1 credit = 1,000,000).

    A hold is negative; its settlement returns the part of the hold that the run did not
    use, and a refund returns all of it. At most one entry of each kind exists per run.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("run_id", "kind", name="uq_ledger_run_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PreferenceFile(Base):
    """An uploaded and validated preference file."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    pair_count: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    token_estimate: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    hf_sft_dataset_name: Mapped[str | None] = mapped_column(String(255))
    hf_dpo_dataset_name: Mapped[str | None] = mapped_column(String(255))
    base_model: Mapped[str] = mapped_column(String(255))
    gpus: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)

    status: Mapped[str] = mapped_column(String(32), default=RunStatus.PENDING.value, index=True)
    percent: Mapped[float] = mapped_column(default=0.0)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    price_per_million_tokens: Mapped[float] = mapped_column(default=0.0)
    hold_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_micro: Mapped[int | None] = mapped_column(BigInteger)
    tokens_trained: Mapped[int | None] = mapped_column(BigInteger)

    enqueued_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(255))
    assigned_gpus: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    step: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    phase_started_at: Mapped[datetime | None]
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    adapter_key: Mapped[str | None] = mapped_column(String(255))

    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def run_status(self) -> RunStatus:
        return RunStatus(self.status)


class Worker(Base):
    """A live or recently seen Celery worker and how many GPUs it offers."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    gpus: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class RunEvent(Base):
    """Something that happened to a run: a status change, a training step's metrics, a message."""

    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_run_id_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
