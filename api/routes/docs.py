"""The API's documentation pages, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, served
with their assets from the package (``api/static/vendor/``) instead of a public CDN, so
they render on a machine without internet access.

FastAPI's documented self-hosting: the app is built with ``docs_url=None, redoc_url=None``
and these routes call ``get_swagger_ui_html`` / ``get_redoc_html`` with local URLs.
The vendored versions are pinned in ``api/static/vendor/README.md``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse

router = APIRouter()

SWAGGER = "/static/vendor/swagger-ui-dist-5.35.0"
REDOC = "/static/vendor/redoc-2.5.4"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


@router.get("/docs", include_in_schema=False)
def swagger_ui() -> HTMLResponse:
    """Swagger UI over ``/openapi.json``, every asset from this server."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="beliefstore — API",
        swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
        oauth2_redirect_url=OAUTH2_REDIRECT,
        # No badge fetched from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None})


@router.get(OAUTH2_REDIRECT, include_in_schema=False)
def swagger_ui_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 redirect page (FastAPI's, as with the default docs)."""
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", include_in_schema=False)
def redoc() -> HTMLResponse:
    """ReDoc over ``/openapi.json``, without Google Fonts."""
    return get_redoc_html(
        openapi_url="/openapi.json", title="beliefstore — API",
        redoc_js_url=f"{REDOC}/redoc.standalone.js",
        redoc_favicon_url=f"{SWAGGER}/favicon-32x32.png", with_google_fonts=False)
