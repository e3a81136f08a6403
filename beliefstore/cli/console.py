"""``beliefstore console``: a one-time login link to the web console.

Like Jupyter's token link: the command posts to the API's ``POST /console/login-links``
with the configured key (``BELIEFSTORE_API_KEY``) and prints the link it gets back. The
link holds a random token, never the key; it works once, within 5 minutes, and is
exchanged for an HTTP-only session cookie of that key.
"""

from __future__ import annotations

import webbrowser
from typing import Annotated

import httpx
import typer

from beliefstore.cli.common import console as stdout
from beliefstore.cli.common import err, fail, load_settings


def console_link(
    subject: Annotated[str | None, typer.Option(
        help="Open this subject's self-model after login.")] = None,
    open_browser: Annotated[bool, typer.Option(
        "--open", help="Also open the link in the default web browser.")] = False,
) -> None:
    """Print a one-time login link to the web console (single use, expires in 5 minutes),
    for the key in BELIEFSTORE_API_KEY; the console then reads the API with that key's
    scopes. Needs the API running (`beliefstore up`, or BELIEFSTORE_API_URL)."""
    settings = load_settings()
    if not settings.api_key:
        raise fail("BELIEFSTORE_API_KEY is not set: the console logs in as the key that asks "
                   "for the link; set it to an API key (`beliefstore keys create`, or the admin "
                   "key `beliefstore up` printed on its first start)", 2)
    try:
        response = httpx.post(f"{settings.api_url}/console/login-links",
                              json={"subject_id": subject} if subject else {},
                              headers={"Authorization": f"Bearer {settings.api_key}"}, timeout=10)
    except httpx.TransportError as exc:
        raise fail(f"cannot reach the API at {settings.api_url} ({exc}): run `beliefstore up`, "
                   "or set BELIEFSTORE_API_URL", 2) from None
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise fail(f"the API refused the login link ({response.status_code}): {detail}")
    link = response.json()
    stdout.print(link["url"], soft_wrap=True, highlight=False)
    err.print(f"single use, expires at {link['expires_at']}")
    if open_browser and not webbrowser.open(link["url"]):
        err.print("[yellow]no web browser found here:[/] open the link above yourself")


def register(app: typer.Typer) -> None:
    """Add ``console`` to ``app``."""
    app.command("console")(console_link)
