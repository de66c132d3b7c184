"""``GET /v1/status`` (the cluster as JSON, for scripts and the page) and ``GET /dashboard`` (the
live status page: one HTML file with its script and style under ``/dashboard/``, no build step,
polling ``/v1/status``).

Both need an admin credential, but the page's HTML holds no data: it asks for the admin key (or
takes it from the URL's fragment, which never reaches a server or its logs), keeps it in the
tab's sessionStorage and sends it as a bearer token with every poll, so no cookie is set and a
cross-site page cannot make the browser fetch the status with it.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

PAGE = Path(__file__).parent / "dashboard.html"
STATIC = Path(__file__).parent / "static"  # its script and style only: the HTML is served with its CSP
# The page may load only its own script and style, and fetch only this origin.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


async def page(_: web.Request) -> web.FileResponse:
    """``GET /dashboard``."""
    return web.FileResponse(PAGE, headers={"Content-Security-Policy": _CSP})


def add_static(app: web.Application) -> None:
    """The page's script and style, under ``/dashboard/``."""
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/", _to_page)
    app.router.add_get("/dashboard/{name}", _static)


# What ``/dashboard/`` serves, by name: nothing else (aiohttp's static route answered a missing
# file with an empty application/octet-stream 404, not the API's error body).
_FILES = {f.name: f for f in STATIC.iterdir() if f.is_file()}


async def _static(request: web.Request) -> web.FileResponse:
    if (path := _FILES.get(request.match_info["name"])) is None:
        raise web.HTTPNotFound(reason=f"no such file of the status page: {request.match_info['name'][:100]!r}")
    return web.FileResponse(path)


async def _to_page(request: web.Request) -> web.Response:
    """``/dashboard/`` is the page too (the browser keeps the ``#key=`` fragment over a redirect).
    Relative: behind a proxy serving the gateway under a path prefix, "/dashboard" left it (a helper)."""
    raise web.HTTPPermanentRedirect("../dashboard")
