"""The gate in front of a page that asks for a password: before login it serves the login form and nothing else."""
from __future__ import annotations

import json
import re

from starlette.middleware import Middleware
from starlette.requests import HTTPConnection

# Gradio guards its API routes with its login check, but not its page: the login page it serves to anyone embeds the
# whole API description (every endpoint with its parameters, and example values such as the paths of the workspace's
# datasets). Before login the gate lets through only what the login form uses (read from a browser's requests):
OPEN_PATHS = frozenset({
    "/",  # the login page, with the API description emptied (below)
    "/login", "/login/",  # the form's POST, which sets the session cookie
    "/gradio_api/startup-events",  # launch() calls it without a cookie to start the queue
    "/theme.css", "/favicon.ico",
})
OPEN_PREFIXES = ("/assets/", "/static/")  # the page's scripts, styles and fonts: the same files for everyone
# The page's JSON escapes "<", so the description cannot contain the "</script>" that ends it.
API_INFO = re.compile(rb"(<script>window\.gradio_api_info = ).*?(;</script>)", re.S)
# Empty rather than removed: with no description at all the login page asks /info for one (a 401) and logs an error.
NO_API_INFO = rb'\1{"named_endpoints":{},"unnamed_endpoints":{}}\2'
NOT_LOGGED_IN = json.dumps({"detail": "Not logged in: open the page and log in first."}).encode()


def signed_in(scope) -> bool:
    """Whether the request carries a session cookie from Gradio's /login, read as Gradio's own login check reads it."""
    app = scope["app"]  # Gradio's App: it keeps the tokens of the sessions its /login opened
    if app.auth is None:
        return True
    cookies = HTTPConnection(scope).cookies
    token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
    return token in app.tokens


def without_api_info(page: bytes) -> bytes | None:
    """The page with its API description emptied, or None when it is not where expected once: a Gradio release that
    moves it then shows an error instead of the API."""
    page, found = API_INFO.subn(NO_API_INFO, page)
    return page if found == 1 else None


class LoginGate:
    """ASGI middleware inside Gradio's app (see `app_kwargs`). A browser that has not logged in gets the login page,
    the files and the form it needs, and 401 for everything else; a logged-in one passes through untouched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or signed_in(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation: refused before the handshake
        elif scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            await self.login_page(scope, receive, send)
        elif scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
        else:
            await respond(send, 401, b"application/json", NOT_LOGGED_IN)

    async def login_page(self, scope, receive, send) -> None:
        start: dict = {}
        body: list[bytes] = []

        async def keep(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                body.append(message.get("body", b""))

        await self.app(scope, receive, keep)
        page = without_api_info(b"".join(body))
        if page is None:
            await respond(send, 500, b"text/plain; charset=utf-8", b"The login page cannot be served safely with "
                          b"this Gradio version: it no longer has its API description where components/login_gate.py "
                          b"expects it.")
            return
        headers = [(name, value) for name, value in start["headers"] if name.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
        await send({"type": "http.response.body", "body": page})


async def respond(send, status: int, content_type: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def app_kwargs() -> dict:
    """What `Blocks.launch(app_kwargs=...)` takes to put the gate in front of the page. The middleware given to the
    FastAPI app at creation sits inside the compression Gradio adds later, so the gate sees the page uncompressed."""
    return {"middleware": [Middleware(LoginGate)]}
