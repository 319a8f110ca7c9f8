"""The admin web page: ``GET /admin/ui``, one static HTML page with one plain script and one
stylesheet (``server/admin/ui/``, no build step).

The page shell is public and holds no data: it asks for the admin key in a password field, keeps
it in the tab's ``sessionStorage`` (gone when the tab closes), and fetches everything it shows
from the JSON admin API (``/admin/adapters``, ``/admin/stats``, ``/admin/stats.png``, ``/jobs``)
with ``Authorization: Bearer <key>``, as any other client does. No cookie carries the key, so a
page on another site cannot make the browser send it: there is no session to ride and nothing to
guard against cross-site request forgery. The page writes data into the DOM only as text, and its
Content-Security-Policy lets it run no script but its own.

This router carries no ``require_admin``: the shell and its two assets are the same for everyone,
and every request that reads or changes data goes to the admin routes, which check the key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

router = APIRouter(tags=["admin page"])

_FILES = Path(__file__).with_name("ui")
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so a new release's page and script arrive together
}


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(_FILES / name, media_type=media_type, headers=_HEADERS)


@router.get("/admin/ui", include_in_schema=False)
async def page() -> FileResponse:
    """The page (no data in it: it asks for the admin key and calls the admin API)."""
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/admin/ui/", include_in_schema=False)
async def page_with_slash() -> RedirectResponse:
    return RedirectResponse("/admin/ui", status_code=308)


@router.get("/admin/ui/app.js", include_in_schema=False)
async def script() -> FileResponse:
    return _file("app.js", "text/javascript; charset=utf-8")


@router.get("/admin/ui/style.css", include_in_schema=False)
async def stylesheet() -> FileResponse:
    return _file("style.css", "text/css; charset=utf-8")
