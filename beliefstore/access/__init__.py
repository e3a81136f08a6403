"""Access control and privacy, in one place; the API and the CLI import it, never the
other way round.

* :mod:`~beliefstore.access.scopes` — which contexts a caller may read and write
  (``*``, restricted contexts) and who the caller is (:class:`Principal`);
* :mod:`~beliefstore.access.keys` — API keys (scrypt-hashed) and restricted contexts
  in PostgreSQL (:class:`KeyStore`);
* :mod:`~beliefstore.access.ratelimit` — per-key token buckets;
* :mod:`~beliefstore.access.datakeys` — per-subject data keys for crypto-shredding,
  wrapped by a master key (:class:`Keyring`);
* :mod:`~beliefstore.access.accesslog` — who read what about whom, on its own topic.
"""
