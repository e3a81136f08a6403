"""The Avro schemas of beliefstore's events: the single source of truth for the wire format.

Each ``NAME.vN.avsc`` file is one version of one event type (namespace ``beliefstore``).
They are shipped as package data and form the schema registry that
:mod:`beliefstore.events.serde` looks up by CRC-64-AVRO fingerprint.
"""
