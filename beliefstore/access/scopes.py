"""Scopes: which contexts an agent may read and write, and who is calling.

A key carries ``read`` / ``write`` scopes: the contexts it may read / write, ``*`` for
every context that is not restricted. A context listed in ``<base schema>.restricted_contexts``
(``beliefstore contexts restrict CONTEXT``) is read and written only by keys that name it
explicitly: ``*`` does not cover it. :class:`ContextScope` is that rule as a predicate
usable both in Python and as a SQL condition; :class:`Principal` is the caller.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from beliefstore.errors import BeliefstoreError

WILDCARD = "*"
"""In a scope: every context that is not restricted."""

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_AGENT = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")


class KeyStoreError(BeliefstoreError, ValueError):
    """A key or context argument is invalid, or a key id is unknown (the message says which)."""


def check_agent(agent: str) -> str:
    """Return ``agent`` if it can be an observation's source, else raise :class:`KeyStoreError`."""
    if not _AGENT.match(agent or ""):
        raise KeyStoreError(f"agent {agent!r} must be 1-256 characters of letters, digits and _ . : - "
                        "(it is the `source` of the agent's observations)")
    return agent


def check_context(context: str) -> str:
    """Return ``context`` if it is a valid context name, else raise :class:`KeyStoreError`."""
    if not _NAME.match(context or ""):
        raise KeyStoreError(f"context {context!r} must be 1-128 characters of letters, digits and "
                        "_ . : -")
    return context


def parse_scope(values: Iterable[str] | str | None) -> frozenset[str]:
    """``"support,billing"`` (or a list of such strings) → ``{"support", "billing"}``;
    ``*`` stands for every unrestricted context.

    Raises:
        KeyStoreError: a name that is neither ``*`` nor a valid context.
    """
    if values is None:
        return frozenset()
    if isinstance(values, str):
        values = [values]
    out = set()
    for value in values:
        for item in (p.strip() for p in value.split(",")):
            if item:
                out.add(item if item == WILDCARD else check_context(item))
    return frozenset(out)


def format_scope(scope: Collection[str]) -> str:
    """``{"billing", "support"}`` → ``"billing,support"`` (``*`` first); empty → ``"-"``."""
    if not scope:
        return "-"
    return ",".join(sorted(scope, key=lambda c: (c != WILDCARD, c)))


def may_access(scope: Collection[str], context: str, restricted: Collection[str]) -> bool:
    """Whether a scope covers ``context``: named explicitly, or ``*`` and not restricted."""
    return context in scope or (WILDCARD in scope and context not in restricted)


@dataclass(frozen=True)
class ContextScope:
    """Which contexts a reader may see, as a predicate usable in Python and in SQL.

    Attributes:
        everything: no restriction at all (authentication is off).
        wildcard: the scope holds ``*``: every context except ``excluded``.
        named: the contexts named explicitly (always readable).
        excluded: restricted contexts not named (only meaningful with ``wildcard``).
    """

    everything: bool = False
    wildcard: bool = False
    named: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()

    @classmethod
    def of(cls, scope: Collection[str], restricted: Collection[str]) -> ContextScope:
        named = frozenset(c for c in scope if c != WILDCARD)
        if WILDCARD in scope:
            return cls(wildcard=True, named=named, excluded=frozenset(restricted) - named)
        return cls(named=named)

    def allows(self, context: str) -> bool:
        if self.everything or context in self.named:
            return True
        return self.wildcard and context not in self.excluded

    def clause(self, column: sa.ColumnElement) -> sa.ColumnElement[bool]:
        """A SQL condition on a context column equivalent to :meth:`allows`."""
        if self.everything or (self.wildcard and not self.excluded):
            return sa.true()
        if self.wildcard:
            return column.not_in(sorted(self.excluded))
        if not self.named:
            return sa.false()
        return column.in_(sorted(self.named))


EVERYTHING = ContextScope(everything=True)


@dataclass(frozen=True)
class Principal:
    """Who is calling the API.

    Attributes:
        agent: the key's agent (``anonymous`` when authentication is off).
        key_id: the key's id, or ``None`` when authentication is off.
        read: contexts it may read (``*``: every unrestricted context).
        write: contexts it may write.
        admin: may use the admin endpoints.
        unrestricted: authentication is off: every context, no source binding.
    """

    agent: str
    key_id: str | None
    read: frozenset[str] = frozenset()
    write: frozenset[str] = frozenset()
    admin: bool = False
    unrestricted: bool = False

    def read_scope(self, restricted: Collection[str]) -> ContextScope:
        return EVERYTHING if self.unrestricted else ContextScope.of(self.read, restricted)

    def may_read(self, context: str, restricted: Collection[str]) -> bool:
        return self.unrestricted or may_access(self.read, context, restricted)

    def may_write(self, context: str, restricted: Collection[str]) -> bool:
        return self.unrestricted or may_access(self.write, context, restricted)

    @property
    def needs_restricted(self) -> bool:
        """Whether the restricted contexts matter to this caller's reads (``*`` scopes)."""
        return not self.unrestricted and (WILDCARD in self.read or WILDCARD in self.write)

    def describe(self) -> str:
        return f"key {self.key_id} of agent {self.agent!r}" if self.key_id else "the caller"


ANONYMOUS = Principal("anonymous", None, frozenset({WILDCARD}), frozenset({WILDCARD}),
                      admin=True, unrestricted=True)
"""The caller when authentication is off (``BELIEFSTORE_AUTH=off``)."""


__all__ = [
    "ANONYMOUS",
    "EVERYTHING",
    "WILDCARD",
    "ContextScope",
    "KeyStoreError",
    "Principal",
    "check_agent",
    "check_context",
    "format_scope",
    "may_access",
    "parse_scope",
]
