"""Sealing the personal fields of observations (value, evidence, metadata) for
crypto-shredding: AES-256-GCM under the subject's data key from a
:class:`~beliefstore.access.datakeys.Keyring`. When the subject is erased its keys are
destroyed, and every sealed event about it on the log becomes unreadable.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from beliefstore.errors import BeliefstoreError, PoisonEvent
from beliefstore.events.model import ObservationRecorded
from beliefstore.timefmt import now_millis

if TYPE_CHECKING:
    from beliefstore.access.datakeys import Keyring


class EventShredded(BeliefstoreError):
    """A sealed observation whose data key was destroyed (its subject was erased).

    Not a poison message: the projector skips it as erased.
    """

    def __init__(self, event_id: str, subject_id: str):
        self.event_id = event_id
        self.subject_id = subject_id
        super().__init__(f"observation {event_id} is sealed under a destroyed key: "
                         f"subject {subject_id!r} was erased")


def _aad(event_id: str, subject_id: str) -> bytes:
    return f"{event_id}|{subject_id}".encode()


class FieldSealer:
    """Seals and opens the personal fields of :class:`ObservationRecorded` events."""

    def __init__(self, keyring: Keyring):
        self.keyring = keyring

    def seal(self, event: ObservationRecorded,
             data_key: tuple[str, bytes] | None = None) -> dict[str, Any]:
        """The Avro ``SealedFields`` record of ``event``'s value, evidence and metadata.

        ``data_key``: the subject's current ``(key_id, key)`` when the caller just got it
        from :meth:`Keyring.data_keys` (one query for a whole group of events); by default
        it is looked up (:meth:`Keyring.data_key`, a query)."""
        key_id, key = data_key or self.keyring.data_key(event.subject_id, now_millis())
        nonce = secrets.token_bytes(12)
        plaintext = json.dumps({"value": event.value, "evidence": event.evidence,
                                "metadata": dict(event.metadata)}).encode()
        ciphertext = AESGCM(key).encrypt(nonce, plaintext,
                                         _aad(event.event_id, event.subject_id))
        return {"key_id": key_id, "nonce": nonce, "ciphertext": ciphertext}

    def open(self, event: ObservationRecorded, sealed: dict[str, Any]) -> ObservationRecorded:
        """``event`` with its personal fields decrypted from ``sealed``.

        Raises:
            EventShredded: the data key was destroyed.
            PoisonEvent: ``invalid_event`` — the ciphertext does not authenticate.
        """
        key = self.keyring.key(sealed["key_id"])
        if key is None:
            raise EventShredded(event.event_id, event.subject_id)
        try:
            plaintext = AESGCM(key).decrypt(sealed["nonce"], sealed["ciphertext"],
                                            _aad(event.event_id, event.subject_id))
            fields = json.loads(plaintext)
            return replace(event, value=fields["value"], evidence=fields["evidence"],
                           metadata=fields["metadata"])
        except (InvalidTag, ValueError, KeyError, TypeError) as exc:
            raise PoisonEvent("invalid_event", f"sealed fields of {event.event_id} do not "
                              f"open: {type(exc).__name__}") from exc
