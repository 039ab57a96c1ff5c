from typing import Any

from fastapi import APIRouter

from app import credits
from app.deps import CallerDep, SessionDep
from app.routing import endpoint

router = APIRouter()


@endpoint(router, "get_credits", ["GET", "POST"])
def get_credits(caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    """Return the caller's credit balance: grants minus holds, plus settlements and refunds."""
    return {"credits": credits.to_credits(credits.balance_micro(session, caller.account_id))}
