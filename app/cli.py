"""`rundpo-server`: serve the API, run workers, apply migrations, manage accounts and keys."""

import argparse
import json
import logging
import os
import sys

from app.settings import get_settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest migration")
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        proxy_headers=True,
    )
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.celery_app import run_worker

    return run_worker(concurrency=args.concurrency, loglevel=args.log_level)


def _cmd_dev(args: argparse.Namespace) -> int:
    from worker.dev import run_dev

    return run_dev(host=args.host, port=args.port)


def _with_session(action):
    from app.accounts import AccountError
    from app.db import session_scope

    try:
        with session_scope() as session:
            return action(session)
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cmd_accounts_create(args: argparse.Namespace) -> int:
    from app.accounts import create_account

    def action(session) -> int:
        account, key = create_account(session, args.name, args.credits)
        if args.json:
            print(json.dumps({"account": account.name, "api_key": key, "credits": args.credits}))
        else:
            print(f"created account {account.name} with {args.credits} credits")
            print(f"API key (shown once, store it now): {key}")
        return 0

    return _with_session(action)


def _cmd_accounts_add_credits(args: argparse.Namespace) -> int:
    from app import credits
    from app.accounts import AccountError, find_account

    def action(session) -> int:
        if args.credits <= 0:
            raise AccountError(f"credits to add must be more than 0, got {args.credits}")
        account = find_account(session, args.name)
        credits.grant(session, account, credits.to_micro(args.credits), "added by an operator")
        session.flush()
        balance = credits.to_credits(credits.balance_micro(session, account.id))
        print(f"added {args.credits} credits to {account.name}; balance {balance}")
        return 0

    return _with_session(action)


def _cmd_accounts_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app import credits
    from app.models import Account

    def action(session) -> int:
        for account in session.scalars(select(Account).order_by(Account.name)):
            print(f"{account.name}\t{credits.to_credits(account.balance_micro)}")
        return 0

    return _with_session(action)


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from app.accounts import create_key, find_account

    def action(session) -> int:
        account = find_account(session, args.name)
        key = create_key(session, account)
        print(f"API key for {account.name} (shown once, store it now):", file=sys.stderr)
        print(key)
        return 0

    return _with_session(action)


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.accounts import find_account
    from app.models import ApiKey

    def action(session) -> int:
        account = find_account(session, args.name)
        keys = session.scalars(
            select(ApiKey).where(ApiKey.account_id == account.id).order_by(ApiKey.id)
        )
        for key in keys:
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
            used = f"{key.last_used_at:%Y-%m-%d %H:%M}" if key.last_used_at else "never"
            print(f"{key.prefix}...\t{state}\tcreated {key.created_at:%Y-%m-%d %H:%M}\tlast used {used}")
        return 0

    return _with_session(action)


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from app.accounts import revoke_key

    def action(session) -> int:
        key = revoke_key(session, args.key_prefix)
        print(f"revoked key {key.prefix}...")
        return 0

    return _with_session(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rundpo-server",
        description="Self-hosted, RunDPO-compatible DPO fine-tuning service. "
        "Settings come from RUNDPO_* environment variables.",
    )
    parser.add_argument("--log-level", default=os.environ.get("RUNDPO_LOG_LEVEL", "info"))
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("migrate", help="create or upgrade the database tables").set_defaults(
        handler=_cmd_migrate
    )

    api = commands.add_parser("api", help="serve the HTTP API with uvicorn")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.set_defaults(handler=_cmd_api)

    worker = commands.add_parser("worker", help="run a Celery training worker")
    worker.add_argument(
        "--concurrency", type=int, default=None, help="runs at once (default: one per GPU, 1 on CPU)"
    )
    worker.set_defaults(handler=_cmd_worker)

    dev = commands.add_parser(
        "dev", help="run the API and one worker together on the embedded defaults"
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(handler=_cmd_dev)

    accounts = commands.add_parser("accounts", help="manage accounts").add_subparsers(
        dest="accounts_command", required=True
    )
    create = accounts.add_parser("create", help="create an account and print its API key")
    create.add_argument("--name", required=True)
    create.add_argument("--credits", type=float, default=0.0, help="initial credits")
    create.add_argument("--json", action="store_true", help="print the result as JSON")
    create.set_defaults(handler=_cmd_accounts_create)
    add_credits = accounts.add_parser("add-credits", help="grant credits to an account")
    add_credits.add_argument("name")
    add_credits.add_argument("credits", type=float)
    add_credits.set_defaults(handler=_cmd_accounts_add_credits)
    accounts.add_parser("list", help="list accounts and balances").set_defaults(
        handler=_cmd_accounts_list
    )

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    key_create = keys.add_parser("create", help="create another API key for an account")
    key_create.add_argument("name", help="account name")
    key_create.set_defaults(handler=_cmd_keys_create)
    key_list = keys.add_parser("list", help="list an account's keys by prefix, state and last use")
    key_list.add_argument("name", help="account name")
    key_list.set_defaults(handler=_cmd_keys_list)
    key_revoke = keys.add_parser(
        "revoke", help="revoke a key by its first characters, rd- included (6 or more)"
    )
    key_revoke.add_argument("key_prefix")
    key_revoke.set_defaults(handler=_cmd_keys_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
