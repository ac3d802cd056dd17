"""The demo page at / and the API description at /docs, both served from the package (no CDN, no build step).

    GET /                     the page (server/web/index.html): speak with any voice, hear it stream, clone on Base
    GET /web/{file}           its script, AudioWorklet and style sheet
    GET /web/config.json      what the page needs before it may call the API: whether a key is required
    GET /docs                 Swagger UI on /openapi.json, its assets from the swagger-ui-py package (/docs/assets)

The page talks to the API of its own origin only: its Content-Security-Policy allows connections to 'self' and
nothing else, and the server's Host and Origin rules (app.RequestGuard) apply to it as to any page. It holds no
secret: with an API key set, it asks for the key and keeps it in memory. `serve --no-web-page` turns it off.
"""

from __future__ import annotations

import importlib.resources
import importlib.util

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response

WEB_FILES = {"app.js": "text/javascript", "player-worklet.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
SWAGGER_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                  "favicon-32x32.png": "image/png"}


def web_dir():
    return importlib.resources.files("qwen_tts_megakernel.server") / "web"


def web_router(*, api_key_required: bool) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    files = web_dir()

    @router.get("/")
    async def index():
        return FileResponse(str(files / "index.html"), media_type="text/html", headers=PAGE_HEADERS)

    @router.get("/web/config.json")
    async def config():
        return JSONResponse({"api_key_required": api_key_required}, headers={"Cache-Control": "no-store"})

    @router.get("/web/{name}")
    async def asset(name: str):
        if name not in WEB_FILES:
            return Response(status_code=404)
        return FileResponse(str(files / name), media_type=WEB_FILES[name], headers=PAGE_HEADERS)

    return router


def swagger_assets_dir():
    """The static folder of the swagger-ui-py package (Swagger UI 5), or None when it is not installed."""
    if importlib.util.find_spec("swagger_ui") is None:
        return None
    folder = importlib.resources.files("swagger_ui") / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def add_offline_docs(app: FastAPI) -> bool:
    """/docs with Swagger UI served from the package; False (no /docs) when swagger-ui-py is missing."""
    assets = swagger_assets_dir()
    if assets is None or app.openapi_url is None:
        return False

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        if name not in SWAGGER_ASSETS:
            return Response(status_code=404)
        return FileResponse(str(assets / name), media_type=SWAGGER_ASSETS[name])

    return True
