"""The ``beliefstore`` command line: one module per command group.

* :mod:`~beliefstore.cli.services` — ``up``, ``projector``, ``api``, ``migrate``;
* :mod:`~beliefstore.cli.ingest` — ``produce``, ``simulate``, ``fold``;
* :mod:`~beliefstore.cli.reads` — ``self-model``, ``trace``, ``history``;
* :mod:`~beliefstore.cli.audit` — ``events get``, ``export``;
* :mod:`~beliefstore.cli.projections` — ``replay``, ``projections list|switch|drop``;
* :mod:`~beliefstore.cli.security` — ``keys``, ``contexts``, ``access-log``;
* :mod:`~beliefstore.cli.demo` — ``demo``;
* :mod:`~beliefstore.cli.calibrate` — ``calibrate`` (trust per source from outcomes);
* :mod:`~beliefstore.cli.watch` — ``watch`` (a subject's belief changes, live);
* :mod:`~beliefstore.cli.common` — what they share (consoles, settings, errors, tables).

No command module imports another; each has a ``register(app)`` that this package
calls, in the order ``--help`` lists them.
"""

from __future__ import annotations

import typer

from beliefstore.cli import audit, calibrate, demo, ingest, projections, reads, security, services
from beliefstore.cli import watch as watch_command

app = typer.Typer(
    help="beliefstore: an event-sourced store of what AI agents believe about the people "
    "they serve. Observations are Avro events on Kafka; a projector folds them into a "
    "self-model in PostgreSQL; an HTTP API serves it. Configure with KAFKA_BOOTSTRAP_SERVERS "
    "and DATABASE_URL; when unset, `up` and `demo` start embedded services under "
    "./.beliefstore/.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (services, ingest, reads, demo, projections, audit, security, calibrate):
    _module.register(app)
watch_command.register(app)


def main() -> None:
    """Entry point of the ``beliefstore`` script."""
    app()


__all__ = ["app", "main"]
