"""The auditor's web console: its page, login (one-time links and the key form), sessions
and logout.

The console is a static page (``api/static/console/``: HTML, CSS and JavaScript modules, no
build step) that reads the JSON API with a session cookie instead of the bearer header
(:func:`beliefstore.api.deps.console_caller`): scopes apply exactly as on the API, and the
cookie authenticates GET requests only. Sessions and links are rows in PostgreSQL
(:mod:`beliefstore.access.consolesessions`), so several API processes share them.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Annotated
from urllib.parse import quote

import sqlalchemy as sa
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from beliefstore.access.consolesessions import COOKIE_NAME, LINK_TTL_S, SESSION_TTL_S
from beliefstore.access.keys import AuthError, KeyStoreError
from beliefstore.api.deps import AppState, Caller, Credentials, State, get_caller
from beliefstore.api.models import (
    ConsoleMeOut,
    ErrorOut,
    LoginIn,
    LoginLinkIn,
    LoginLinkOut,
    WhoAmIOut,
)
from beliefstore.api.security import AUTH_RESPONSES, forbidden, too_many_requests, unauthorized

router = APIRouter()

CONSOLE_HEADER = "X-Beliefstore-Console"
"""Logout must carry this header: a cross-site form cannot send it (CSRF)."""

# Everything the page loads comes from this server; no inline script or style attribute.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def console_page() -> str:
    """The console's HTML page, from the installed package (``api/static/console``)."""
    return (files("beliefstore.api") / "static" / "console" / "index.html").read_text("utf-8")


def _set_session(request: Request, response: Response, state: AppState, key_id: str) -> None:
    token = state.console.open_session(key_id)
    response.set_cookie(
        COOKIE_NAME, token, max_age=SESSION_TTL_S, path="/", httponly=True, samesite="strict",
        secure=request.url.scheme == "https")


@router.get("/console", include_in_schema=False)
def console_root() -> RedirectResponse:
    """``/console`` → ``/console/`` (the page's relative links need the slash)."""
    return RedirectResponse("/console/", status_code=307)


@router.get("/console/", include_in_schema=False)
def console_index() -> HTMLResponse:
    """The console (a single page; its views are ``#/...`` routes in the browser)."""
    return HTMLResponse(console_page(), headers=SECURITY_HEADERS)


@router.post("/console/login-links", response_model=LoginLinkOut, status_code=201,
             responses={**AUTH_RESPONSES, 400: {"model": ErrorOut,
                                                "description": "Authentication is off."}},
             tags=["console"])
def create_login_link(caller: Caller, state: State, request: Request,
                      body: LoginLinkIn | None = None) -> LoginLinkOut:
    """A single-use console login link for the key that asks (bearer header only), valid
    for 5 minutes; ``beliefstore console`` prints it. The link holds a random token, never
    the key: the token maps server side to the key verified now."""
    if caller.key_id is None:
        raise HTTPException(400, "authentication is off (BELIEFSTORE_AUTH=off): open "
                            "/console/ directly, no login is needed")
    subject = body.subject_id if body else None
    link = state.console.create_link(caller.key_id, subject, LINK_TTL_S)
    url = str(request.base_url).rstrip("/") + "/console/login?token=" + link.token
    return LoginLinkOut(url=url, expires_at=link.expires_at)


def _login_failed_page(message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>beliefstore console"
        "</title><meta name=viewport content='width=device-width, initial-scale=1'>"
        "<link rel=stylesheet href='/static/console/console.css'></head><body><main class=page>"
        f"<h1>Login failed</h1><p role=alert>{message}</p>"
        "<p><a href='/console/'>Log in with an API key</a></p></main></body></html>")
    return HTMLResponse(body, status_code=401, headers=SECURITY_HEADERS)


@router.get("/console/login", include_in_schema=False)
def redeem_login_link(request: Request, state: State,
                      token: Annotated[str, Query(max_length=100)] = "") -> Response:
    """Exchange a one-time link for a session cookie, then open the console."""
    try:
        redeemed = state.console.redeem_link(token) if token else None
        key = state.keys.get(redeemed.key_id) if redeemed else None
    except sa.exc.SQLAlchemyError as exc:
        raise HTTPException(503, f"the database is unreachable: {exc.__class__.__name__}") from None
    except KeyStoreError:  # the key was deleted: the link is invalid
        key = None
    if redeemed is None or key is None or not key.active:
        return _login_failed_page(
            "This login link is unknown, expired (links last 5 minutes) or was used already "
            "(each works once). Run <code>beliefstore console</code> again for a new one, "
            "or log in with an API key.")
    target = "/console/" + (f"#/s/{quote(redeemed.subject_id, safe='')}"
                            if redeemed.subject_id else "")
    response = RedirectResponse(target, status_code=303, headers={
        "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    _set_session(request, response, state, key.key_id)
    return response


@router.post("/console/session", response_model=WhoAmIOut, responses=AUTH_RESPONSES,
             tags=["console"])
def login(body: LoginIn, request: Request, state: State) -> Response:
    """Log in with an API key (the console's form): sets the HTTP-only session cookie."""
    client = request.client.host if request.client else "unknown"
    failures = f"authfail:{client}"
    wait = state.limiter.exhausted(failures)
    if wait is not None:
        raise too_many_requests(f"too many failed authentications from {client}", wait)
    try:
        key = state.keys.authenticate(body.key)
    except AuthError as exc:
        state.limiter.acquire(failures)
        raise unauthorized(str(exc), exc.reason) from None
    principal = key.principal()
    response = Response(WhoAmIOut(
        agent=principal.agent, key_id=principal.key_id, read=sorted(principal.read),
        write=sorted(principal.write), admin=principal.admin, auth=state.settings.auth,
        restricted_contexts=[]).model_dump_json(), media_type="application/json")
    _set_session(request, response, state, key.key_id)
    return response


@router.post("/console/logout", status_code=204, tags=["console"], responses={
    403: {"model": ErrorOut, "description": "The X-Beliefstore-Console header is missing."}})
def logout(request: Request, state: State,
           marker: Annotated[str | None, Header(alias=CONSOLE_HEADER)] = None) -> Response:
    """End the console session and clear its cookie. Needs the ``X-Beliefstore-Console``
    header, which a cross-site form cannot send."""
    if marker is None:
        raise forbidden(f"logout needs the {CONSOLE_HEADER} header (the console sends it)")
    session = request.cookies.get(COOKIE_NAME)
    if session:
        state.console.end_session(session)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@router.get("/console/me", response_model=ConsoleMeOut, responses=AUTH_RESPONSES,
            tags=["console"])
async def me(request: Request, state: State, credentials: Credentials) -> ConsoleMeOut:
    """Whether the request is logged in (session cookie or bearer key) and as whom (as
    ``/v1/whoami``); 200 either way, so the console's first look logs no error. Carries
    the half-lives that tell how stale a belief is."""
    halves = {"default_half_life_s": state.settings.default_half_life_s,
              "half_lives": dict(state.settings.half_lives)}
    try:
        caller = await get_caller(request, state, credentials)
    except HTTPException as exc:
        if exc.status_code != 401:
            raise
        return ConsoleMeOut(authenticated=False, detail=str(exc.detail), **halves)
    restricted = state.keys.restricted() if state.settings.auth else frozenset()
    return ConsoleMeOut(authenticated=True, caller=WhoAmIOut(
        agent=caller.agent, key_id=caller.key_id, read=sorted(caller.read),
        write=sorted(caller.write), admin=caller.admin, auth=state.settings.auth,
        restricted_contexts=sorted(c for c in restricted if c in caller.read)), **halves)
