"""Accounts and their API keys."""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Connection, select, update
from sqlalchemy.orm import Session

from app import credits
from app.models import Account, ApiKey, utcnow
from app.security import (
    KEY_PREFIX_LENGTH,
    generate_api_key,
    hash_api_key,
    hashes_match,
    key_prefix,
)

logger = logging.getLogger(__name__)

# Maximum age of `api_keys.last_used_at` before a request refreshes it, which saves a
# write on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class AccountError(Exception):
    """An admin command that cannot be done; the message gives the reason."""


@dataclass(frozen=True)
class Caller:
    """The account behind a request's API key."""

    account_id: int
    account_name: str
    key_id: int
    key_prefix: str


def create_account(session: Session, name: str, credits_granted: float) -> tuple[Account, str]:
    """Create an account with an initial grant and return it with its first API key."""
    name = name.strip()
    if not name:
        raise AccountError("the account name must not be empty")
    if session.scalar(select(Account.id).where(Account.name == name)) is not None:
        raise AccountError(f"an account named {name!r} already exists")
    if credits_granted < 0:
        raise AccountError(f"credits must be 0 or more, got {credits_granted}")

    account = Account(name=name, balance_micro=0)
    session.add(account)
    session.flush()
    if credits_granted > 0:
        credits.grant(session, account, credits.to_micro(credits_granted), "initial grant")
    key = create_key(session, account)
    logger.info("created account %s (id %s)", name, account.id)
    return account, key


def find_account(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise AccountError(f"no account named {name!r}; list accounts with `accounts list`")
    return account


def create_key(session: Session, account: Account) -> str:
    key = generate_api_key()
    session.add(ApiKey(account_id=account.id, prefix=key_prefix(key), key_hash=hash_api_key(key)))
    session.flush()
    return key


def revoke_key(session: Session, prefix: str) -> ApiKey:
    """Revoke the one live key that starts with `prefix` (its shown prefix or the whole key)."""
    if len(prefix) < 6:
        raise AccountError("give at least the first 6 characters of the key, e.g. rd-AbCd")
    if len(prefix) > KEY_PREFIX_LENGTH:
        condition = ApiKey.prefix == prefix[:KEY_PREFIX_LENGTH]
    else:
        condition = ApiKey.prefix.startswith(prefix, autoescape=True)
    keys = session.scalars(select(ApiKey).where(condition, ApiKey.revoked_at.is_(None))).all()
    if not keys:
        raise AccountError(f"no live key starts with {prefix!r}")
    if len(keys) > 1:
        raise AccountError(f"{len(keys)} keys start with {prefix!r}; give more characters of it")
    keys[0].revoked_at = utcnow()
    return keys[0]


def last_used_is_stale(last_used: datetime | None) -> bool:
    """Tell whether a key's `last_used_at` is older than `LAST_USED_RESOLUTION`."""
    if last_used is None:
        return True
    if last_used.tzinfo is None:
        last_used = last_used.replace(tzinfo=timezone.utc)
    return utcnow() - last_used > LAST_USED_RESOLUTION


def touch_key(db: Session | Connection, key_id: int) -> None:
    """Set a key's `last_used_at` to now and commit."""
    db.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))
    db.commit()


def authenticate(db: Session | Connection, key: str) -> Caller | None:
    """Return the caller for a live API key, or None.

    `db` is an ORM session or a Core connection. It is committed when `last_used_at` is
    refreshed, which happens when the stored time is older than `LAST_USED_RESOLUTION`.
    """
    if not key.startswith("rd-"):
        return None
    key_hash = hash_api_key(key)
    row = db.execute(
        select(
            ApiKey.id,
            ApiKey.account_id,
            ApiKey.prefix,
            ApiKey.key_hash,
            ApiKey.revoked_at,
            ApiKey.last_used_at,
            Account.name,
        )
        .join(Account, Account.id == ApiKey.account_id)
        .where(ApiKey.key_hash == key_hash)
    ).first()
    if row is None or row.revoked_at is not None or not hashes_match(row.key_hash, key):
        return None
    if last_used_is_stale(row.last_used_at):
        touch_key(db, row.id)
    return Caller(row.account_id, row.name, row.id, row.prefix)
