"""The ``beliefstore`` command line: one module per command group.

* :mod:`~beliefstore.cli.services` — ``up``, ``projector``, ``api``, ``migrate``;
* :mod:`~beliefstore.cli.ingest` — ``produce``, ``simulate``, ``fold``;
* :mod:`~beliefstore.cli.reads` — ``self-model``, ``trace``, ``history``;
* :mod:`~beliefstore.cli.audit` — ``events get``, ``export``;
* :mod:`~beliefstore.cli.projections` — ``replay``, ``projections list|switch|drop``;
* :mod:`~beliefstore.cli.security` — ``keys``, ``contexts``, ``access-log``;
* :mod:`~beliefstore.cli.demo` — ``demo``;
* :mod:`~beliefstore.cli.calibrate` — ``calibrate`` (trust per source from outcomes);
* :mod:`~beliefstore.cli.mcp` — ``mcp`` (the MCP server over stdio);
* :mod:`~beliefstore.cli.console` — ``console`` (a one-time login link to the web console);
* :mod:`~beliefstore.cli.watch` — ``watch`` (a subject's belief changes, live);
* :mod:`~beliefstore.cli.common` — what they share (consoles, settings, errors, tables).

No command module imports another; each has a ``register(app)`` that this package
calls, in the order ``--help`` lists them.
"""

from __future__ import annotations

import typer

from beliefstore.cli import audit, calibrate, demo, ingest, projections, reads, security, services
from beliefstore.cli import console as console_cli
from beliefstore.cli import mcp as mcp_command
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
mcp_command.register(app)
console_cli.register(app)
watch_command.register(app)


def main() -> None:
    """Entry point of the ``beliefstore`` script.

    An expected failure (a service down, a file that cannot be read; see
    :func:`~beliefstore.cli.common.expected_failure`) ends with one ``error:`` line and exit
    status 1; ``--verbose`` (or ``-v``) shows its traceback too.
    """
    import sys

    from rich.markup import escape

    from beliefstore.cli.common import err, expected_failure

    try:
        app()
    except Exception as exc:
        message = expected_failure(exc)
        if message is None or {"--verbose", "-v"} & set(sys.argv[1:]):
            raise
        err.print(f"[red]error:[/] {escape(message)} (--verbose shows the traceback where a "
                  "command has it)", highlight=False)
        sys.exit(1)


__all__ = ["app", "main"]
