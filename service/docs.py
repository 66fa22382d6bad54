"""The API's documentation: /openapi.json, completed with what FastAPI cannot derive from the
routes, and the Swagger UI at /docs, served from the `swagger-ui-bundle` wheel instead of a CDN,
so the page works on air-gapped installs (FastAPI's default page loads its scripts from
jsDelivr)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from service.deps import require_read_key
from service.settings import Settings

STATIC = "/static/swagger-ui"


def add_offline_docs(app: FastAPI) -> None:
    """Mount the Swagger UI assets and the /docs page; `app` must have `docs_url=None`."""
    app.mount(STATIC, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC}/favicon-32x32.png",
        )


def complete_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` describe this replica's contract, which FastAPI cannot derive from
    the routes alone:

    - the read routes (`require_read_key`) take the API key only with
      LETTERREC_REQUIRE_KEY_FOR_RECOMMEND set; otherwise their security requirement is optional
      (`[{}, {"HTTPBearer": []}]`: no key, or a key);
    - `repeat: true` needs a bundle with a fitted repeat prior; without one it is not offered.

    Built from what the lifespan loaded (settings, bundle) and cached; asked before the
    lifespan ran, it answers from the defaults without caching.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        settings: Settings | None = app.state.settings
        state = getattr(app.state, "letterrec", None)
        key_required = (
            settings.require_key_for_recommend
            if settings is not None
            else Settings.model_fields["require_key_for_recommend"].default
        )
        if not key_required:
            _optional_read_key(schema, app)
        if state is not None and state.recommend.defaults.prior is None:
            _no_repeat(schema)
        app.openapi_schema = schema if settings is not None and state is not None else None
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _optional_read_key(schema: dict[str, Any], app: FastAPI) -> None:
    for route in app.routes:
        if isinstance(route, APIRoute) and any(
            d.dependency is require_read_key for d in route.dependencies
        ):
            for method in route.methods:
                operation = schema["paths"][route.path_format][method.lower()]
                operation["security"] = [{}, *operation.get("security", [])]


def _no_repeat(schema: dict[str, Any]) -> None:
    repeat = schema["components"]["schemas"]["RecommendRequest"]["properties"]["repeat"]
    repeat["anyOf"] = [{"type": "boolean", "const": False}, {"type": "null"}]
    repeat["description"] = (
        repeat.get("description", "") + " Not offered: this bundle has no fitted repeat prior."
    ).strip()
