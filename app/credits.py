"""The credit ledger: grants, holds, settlements and refunds.

Amounts are integers in micro-credits (1 credit = 1,000,000) so that sums are exact on every
database. The balance is the sum of an account's ledger entries. A hold is taken with one
conditional UPDATE of the sum kept on the account row (`accounts.balance_micro`), in the same
transaction as its ledger entry, so concurrent holds can never take the balance below zero,
on PostgreSQL and on SQLite alike.
"""

import logging
import math

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Account, LedgerEntry, LedgerKind, Run

logger = logging.getLogger(__name__)

MICRO = 1_000_000


def to_micro(credits: float) -> int:
    return round(credits * MICRO)


def to_credits(micro: int) -> float:
    return micro / MICRO


def estimate_cost_micro(
    token_count: int,
    sft_ratio: float,
    sft_num_train_epochs: float,
    dpo_num_train_epochs: float,
    price_per_million_tokens: float,
) -> int:
    """Estimate a run's cost in micro-credits, rounded up.

    trained tokens = token_count × (sft_ratio × sft_num_train_epochs + dpo_num_train_epochs)
    cost = trained tokens / 1,000,000 × price_per_million_tokens

    `token_count` is the file's token estimate from upload (characters / 4). SFT trains on the
    `sft_ratio` sample of pairs for its epochs, and DPO trains on every pair for its epochs.
    """
    trained_tokens = token_count * (sft_ratio * sft_num_train_epochs + dpo_num_train_epochs)
    return math.ceil(trained_tokens * price_per_million_tokens)


def actual_cost_micro(tokens_trained: int, price_per_million_tokens: float) -> int:
    return math.ceil(tokens_trained * price_per_million_tokens)


def balance_micro(session: Session, account_id: int) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0)).where(
            LedgerEntry.account_id == account_id
        )
    )
    return int(total or 0)


def _add_entry(
    session: Session, account_id: int, kind: LedgerKind, amount: int, run: Run | None, note: str
) -> LedgerEntry:
    entry = LedgerEntry(
        account_id=account_id,
        run_id=run.id if run is not None else None,
        kind=kind.value,
        amount_micro=amount,
        note=note,
    )
    session.add(entry)
    session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(balance_micro=Account.balance_micro + amount)
    )
    return entry


def grant(session: Session, account: Account, amount_micro: int, note: str = "") -> LedgerEntry:
    if amount_micro <= 0:
        raise ValueError(f"a grant must be positive, got {to_credits(amount_micro)} credits")
    return _add_entry(session, account.id, LedgerKind.GRANT, amount_micro, None, note)


def hold(session: Session, run: Run, amount_micro: int) -> None:
    """Hold `amount_micro` for `run`, or raise 402 when the balance is too low.

    The run must already be flushed (it needs an id). The caller commits.
    """
    result = session.execute(
        update(Account)
        .where(Account.id == run.account_id, Account.balance_micro >= amount_micro)
        .values(balance_micro=Account.balance_micro - amount_micro)
    )
    if result.rowcount != 1:
        available = session.scalar(
            select(Account.balance_micro).where(Account.id == run.account_id)
        )
        raise ApiError(
            402,
            f"Insufficient credits: this run's estimated cost is "
            f"{to_credits(amount_micro):.6f} credits and the balance is "
            f"{to_credits(available or 0):.6f}. Add credits, or lower the epochs or sft_ratio.",
        )
    session.add(
        LedgerEntry(
            account_id=run.account_id,
            run_id=run.id,
            kind=LedgerKind.HOLD.value,
            amount_micro=-amount_micro,
            note=f"hold for run {run.name}",
        )
    )
    run.hold_micro = amount_micro


def _release(session: Session, run: Run, kind: LedgerKind, amount: int, note: str) -> bool:
    """Add the one settlement or refund entry of a run; False if the run already has one."""
    existing = session.scalar(
        select(LedgerEntry.id).where(
            LedgerEntry.run_id == run.id,
            LedgerEntry.kind.in_([LedgerKind.SETTLEMENT.value, LedgerKind.REFUND.value]),
        )
    )
    if existing is not None:
        return False
    # A concurrent second release fails on the unique (run_id, kind) constraint at commit.
    _add_entry(session, run.account_id, kind, amount, run, note)
    return True


def settle(session: Session, run: Run, tokens_trained: int, price_per_million_tokens: float) -> int:
    """Charge the actual cost of a completed run, at most its hold, and return the unused rest.

    Returns the cost in micro-credits. Settling twice changes nothing the second time.
    """
    cost = min(actual_cost_micro(tokens_trained, price_per_million_tokens), run.hold_micro)
    returned = run.hold_micro - cost
    if _release(
        session,
        run,
        LedgerKind.SETTLEMENT,
        returned,
        f"run {run.name} trained {tokens_trained} tokens: cost {to_credits(cost):.6f}",
    ):
        run.cost_micro = cost
        run.tokens_trained = tokens_trained
        logger.info(
            "settled run %s account %s: cost %s micro-credits", run.name, run.account_id, cost
        )
    return cost


def refund(session: Session, run: Run, reason: str) -> None:
    """Return a failed or cancelled run's whole hold; refunding twice changes nothing."""
    if run.hold_micro <= 0:
        return
    if _release(session, run, LedgerKind.REFUND, run.hold_micro, f"run {run.name}: {reason}"):
        run.cost_micro = 0
        logger.info("refunded run %s account %s", run.name, run.account_id)
