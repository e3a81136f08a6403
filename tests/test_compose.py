"""docker-compose.yml stays in step with the code: the beliefstore services are wired
only with environment variables the code reads, run real CLI commands, and point at
the compose file's own Kafka and PostgreSQL services.

No Docker engine is needed: the file is parsed, not run.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from beliefstore.cli import app
from beliefstore.db import sqlalchemy_url
from beliefstore.settings import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _beliefstore_services(services: dict[str, dict]) -> dict[str, dict]:
    """The services built from the project's Dockerfile."""
    out = {}
    for name, spec in services.items():
        build = spec.get("build")
        if build is None:
            continue
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        if (ROOT / context / dockerfile).resolve() == (ROOT / "Dockerfile").resolve():
            out[name] = spec
    return out


def _environment(spec: dict) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...] form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command(spec: dict) -> list[str]:
    command = spec.get("command")
    return command.split() if isinstance(command, str) else list(command or [])


def test_the_app_services_are_built_from_the_dockerfile(services: dict[str, dict]) -> None:
    assert (ROOT / "Dockerfile").is_file()
    assert {"migrate", "projector", "api"} <= set(_beliefstore_services(services))


def test_every_variable_set_on_a_beliefstore_service_is_read_by_the_code(
    services: dict[str, dict],
) -> None:
    for name, spec in _beliefstore_services(services).items():
        env = _environment(spec)
        assert env, f"service {name} sets no environment"
        unknown = sorted(set(env) - set(ENV_VARS))
        assert not unknown, (
            f"service {name} sets {unknown}, which beliefstore never reads "
            f"(beliefstore.settings.ENV_VARS)"
        )
        Settings.from_env(env, use_running=False)  # every value is usable


def test_the_services_run_real_cli_commands(services: dict[str, dict]) -> None:
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    expected = {"migrate": "migrate", "projector": "projector", "api": "api"}
    for service, command in expected.items():
        argv = _command(services[service])
        assert argv[:1] == ["beliefstore"], f"{service}: {argv}"
        assert argv[1] == command, f"{service} runs {argv}, expected `beliefstore {command}`"
        assert argv[1] in commands, f"{service}: `{argv[1]}` is not a beliefstore command"
    assert "--host" in _command(services["api"])


def test_the_services_point_at_the_compose_kafka_and_postgres(services: dict[str, dict]) -> None:
    for name, spec in _beliefstore_services(services).items():
        env = _environment(spec)
        brokers = env["KAFKA_BOOTSTRAP_SERVERS"].split(",")
        for broker in brokers:
            host, _, port = broker.strip().rpartition(":")
            assert host in services, f"{name}: broker {broker!r} is not a compose service"
            assert port.isdigit()
        url = env["DATABASE_URL"]
        sqlalchemy_url(url)  # a PostgreSQL URL the code accepts
        parts = urlsplit(url)
        assert parts.hostname in services, f"{name}: database host {parts.hostname!r}"
        assert parts.hostname and services[parts.hostname]["image"].startswith("postgres:")
        pg_env = _environment(services[parts.hostname])
        assert parts.username == pg_env["POSTGRES_USER"]
        assert parts.password == pg_env["POSTGRES_PASSWORD"]
        assert parts.path.lstrip("/") == pg_env["POSTGRES_DB"]


def test_the_kafka_service_advertises_the_address_the_app_uses(services: dict[str, dict]) -> None:
    kafka_env = _environment(services["kafka"])
    assert "broker" in kafka_env["KAFKA_PROCESS_ROLES"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    for name, spec in _beliefstore_services(services).items():
        for broker in _environment(spec)["KAFKA_BOOTSTRAP_SERVERS"].split(","):
            assert f"//{broker.strip()}" in advertised, f"{name}: {broker} not advertised"


def test_projector_and_api_wait_for_healthy_services_and_the_migration(
    services: dict[str, dict],
) -> None:
    for name in ("projector", "api"):
        depends = services[name]["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    for name in ("kafka", "postgres"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    assert services["projector"].get("stop_signal") == "SIGTERM"
