"""Who the caller is, and the admin view of API keys.
"""

from __future__ import annotations

from fastapi import APIRouter

from beliefstore.api.deps import Caller, State
from beliefstore.api.models import (
    KeyOut,
    WhoAmIOut,
)
from beliefstore.api.security import (
    ADMIN_RESPONSES,
    AUTH_RESPONSES,
    forbidden,
)

router = APIRouter()


@router.get("/v1/whoami", response_model=WhoAmIOut, responses=AUTH_RESPONSES, tags=["access"])
def whoami(caller: Caller, state: State) -> WhoAmIOut:
    """The key's agent and scopes, as the API applies them."""
    restricted = state.keys.restricted() if state.settings.auth else frozenset()
    return WhoAmIOut(
        agent=caller.agent, key_id=caller.key_id, read=sorted(caller.read),
        write=sorted(caller.write), admin=caller.admin, auth=state.settings.auth,
        restricted_contexts=sorted(c for c in restricted if c in caller.read))

@router.get("/v1/admin/keys", response_model=list[KeyOut], responses=ADMIN_RESPONSES,
         tags=["access"])
def admin_keys(caller: Caller, state: State) -> list[KeyOut]:
    """Every API key's metadata, revoked ones included (admin keys only). Keys are
    made and revoked with the `beliefstore keys` commands."""
    if not caller.admin:
        raise forbidden(f"{caller.describe()} is not an admin key; admin keys are made with "
                        "`beliefstore keys create --agent NAME --admin`")
    return [KeyOut(key_id=k.key_id, agent=k.agent, read=sorted(k.read), write=sorted(k.write),
                   admin=k.admin, created_at=k.created_at, revoked_at=k.revoked_at)
            for k in state.keys.list_keys()]
