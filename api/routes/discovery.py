"""Discovery: which event schemas the API knows, and which contexts a key may read.

An agent that cannot import the Kafka SDK learns here what it may write and read:
``GET /v1/schemas`` (every ``.avsc``), ``GET /v1/schemas/{fingerprint}`` and
``GET /v1/contexts`` (the contexts in the key's read scope, with their attributes,
belief counts, half-life and whether they are restricted).
"""

from __future__ import annotations

from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Request

from beliefstore.access.scopes import WILDCARD
from beliefstore.api.deps import Caller, Conn, State, read_scope
from beliefstore.api.models import AttributeOut, ContextOut, ContextsOut, SchemaOut, SchemasOut
from beliefstore.api.security import AUTH_RESPONSES, READ_RESPONSES, TRACE_RESPONSES
from beliefstore.events.serde import RegisteredSchema, SchemaRegistry
from beliefstore.projector.tables import beliefs

router = APIRouter()


def registry(request: Request) -> SchemaRegistry:
    """The schemas this API process knows: the shipped ``schemas/`` and
    ``BELIEFSTORE_SCHEMA_PATH``, read once per app."""
    found = getattr(request.app.state, "schema_registry", None)
    if found is None:
        found = request.app.state.schema_registry = SchemaRegistry.default()
    return found


def _schema_out(reg: SchemaRegistry, entry: RegisteredSchema) -> SchemaOut:
    return SchemaOut(name=entry.name, version=entry.version, fingerprint=entry.fingerprint.hex(),
                     current=reg.is_current(entry), schema=entry.document)


@router.get("/v1/schemas", response_model=SchemasOut, responses=AUTH_RESPONSES,
            tags=["discovery"])
def list_schemas(caller: Caller, request: Request) -> SchemasOut:
    """Every Avro schema the API knows (shipped, and extra writer schemas from
    BELIEFSTORE_SCHEMA_PATH): record name, version, fingerprint and the ``.avsc``
    document, by name then version."""
    reg = registry(request)
    return SchemasOut(schemas=[_schema_out(reg, e) for e in sorted(
        reg, key=lambda e: (e.name, e.version, e.fingerprint))])


Fingerprint = Annotated[str, Path(
    description="16 hex digits: the CRC-64-AVRO fingerprint as in the single-object header "
    "(little-endian) and in a trace's writer_fingerprint.")]


@router.get("/v1/schemas/{fingerprint}", response_model=SchemaOut, responses=READ_RESPONSES,
            tags=["discovery"])
def get_schema(caller: Caller, request: Request, fingerprint: Fingerprint) -> SchemaOut:
    """One schema by fingerprint; 404 naming the known ones if none has it."""
    reg = registry(request)
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError:
        raw = b""
    if len(raw) != 8:
        raise HTTPException(422, [{"loc": ["path", "fingerprint"], "type": "value_error",
                                   "msg": f"{fingerprint!r} is not 16 hex digits (8 bytes); "
                                   "take one from GET /v1/schemas"}])
    for entry in reg:
        if entry.fingerprint == raw:
            return _schema_out(reg, entry)
    known = ", ".join(sorted(e.fingerprint.hex() for e in reg))
    raise HTTPException(404, f"no schema has fingerprint {fingerprint.lower()}; known: {known} "
                        "(GET /v1/schemas lists them; a newer writer's .avsc goes in a folder "
                        "on BELIEFSTORE_SCHEMA_PATH)")


@router.get("/v1/contexts", response_model=ContextsOut, responses=TRACE_RESPONSES,
            tags=["discovery"])
def list_contexts(caller: Caller, conn: Conn, state: State) -> ContextsOut:
    """The contexts the key may read: every context with beliefs in its read scope, and
    every context the scope names explicitly (even without beliefs yet); each with its
    attributes and their belief counts, the fold's half-life and whether it is
    restricted. 403 if the key may read nothing."""
    scope = read_scope(caller, state)
    b = beliefs
    rows = conn.execute(
        sa.select(b.c.context, b.c.attribute, sa.func.count().label("n"))
        .where(scope.clause(b.c.context))
        .group_by(b.c.context, b.c.attribute)
        .order_by(b.c.context, b.c.attribute))
    attributes: dict[str, list[AttributeOut]] = {}
    for row in rows:
        attributes.setdefault(row.context, []).append(AttributeOut(attribute=row.attribute,
                                                                   belief_count=row.n))
    for named in caller.read:
        if named != WILDCARD:
            attributes.setdefault(named, [])
    restricted = state.keys.restricted() if state.settings.auth else frozenset()
    fold = state.settings.fold_settings
    return ContextsOut(contexts=[
        ContextOut(context=c, attributes=attrs, belief_count=sum(a.belief_count for a in attrs),
                   half_life_s=fold.half_life_s(c), restricted=c in restricted)
        for c, attrs in sorted(attributes.items())
    ])
