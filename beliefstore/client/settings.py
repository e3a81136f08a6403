"""Where the client finds the API and its key when they are not given."""

from __future__ import annotations

from beliefstore.settings import Settings


def client_defaults(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """``(base_url, api_key)``: the arguments, else BELIEFSTORE_API_URL (or a running
    ``beliefstore up``'s address) and BELIEFSTORE_API_KEY.

    Raises:
        beliefstore.settings.SettingsError: an environment variable is unusable.
    """
    if base_url is not None and api_key is not None:
        return base_url.rstrip("/"), api_key
    settings = Settings.from_env()
    return (base_url or settings.api_url).rstrip("/"), api_key if api_key is not None \
        else settings.api_key
