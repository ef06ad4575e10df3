"""Before login the page serves the login form and nothing else: checked on the gate alone, then on the real app
through an HTTP client, Gradio's own client and a browser."""
from __future__ import annotations

import json
import re
from contextlib import contextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from components.login_gate import LoginGate, without_api_info

USER, PASSWORD = "ann", "long-password"
API_PAGE = '<html><script>window.gradio_api_info = {"named_endpoints":{"/train_secret":{}}};</script></html>'


def fake_gradio_app() -> Starlette:
    """Gradio's app as the gate sees it: its credentials, its cookie name and the tokens its /login handed out."""
    async def page(request):
        return HTMLResponse(API_PAGE)

    async def other(request):
        return PlainTextResponse(f"from the app: {request.url.path}")

    routes = [Route("/", page, methods=["GET", "HEAD"]), Route("/{path:path}", other, methods=["GET", "POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(LoginGate)])
    app.auth, app.cookie_id, app.tokens = {USER: PASSWORD}, "c1", {"good-token": USER}
    return app


@pytest.mark.parametrize(
    "method, path, cookie, status, passed_on",
    [
        ("GET", "/", None, 200, False),  # the login page, its API description emptied
        ("GET", "/", "good-token", 200, True),
        ("GET", "/", "stolen-guess", 200, False),
        ("POST", "/login", None, 200, True),
        ("GET", "/assets/index.js", None, 200, True),
        ("GET", "/static/fonts/a.woff2", None, 200, True),
        ("GET", "/theme.css", None, 200, True),
        ("GET", "/gradio_api/startup-events", None, 200, True),
        ("GET", "/config", None, 401, False),
        ("GET", "/gradio_api/info", None, 401, False),
        ("GET", "/gradio_api/runs", None, 401, False),  # Gradio renders the page, API description and all, here too
        ("GET", "/gradio_api/app_id", None, 401, False),
        ("POST", "/gradio_api/queue/join", None, 401, False),
        ("GET", "/gradio_api/info", "good-token", 200, True),
        ("POST", "/gradio_api/queue/join", "good-token", 200, True),
    ],
)
def test_the_gate_lets_through_only_the_login_form_before_login(method, path, cookie, status, passed_on):
    client = TestClient(fake_gradio_app())
    if cookie:
        client.cookies.set("access-token-unsecure-c1", cookie)
    response = client.request(method, path)
    assert response.status_code == status
    assert ("/train_secret" in response.text or "from the app" in response.text) is passed_on


@pytest.mark.parametrize(
    "page, kept",
    [
        (API_PAGE,
         '<html><script>window.gradio_api_info = {"named_endpoints":{},"unnamed_endpoints":{}};</script></html>'),
        ("<html>a page that moved its API description elsewhere</html>", None),  # fail closed, not open
        (API_PAGE + API_PAGE, None),
    ],
)
def test_the_api_description_is_emptied_or_the_page_refused(page, kept):
    assert without_api_info(page.encode()) == (kept.encode() if kept else None)


# --- the real app, served with --auth, a dataset in its workspace ---

@pytest.fixture(scope="module")
def gated_app(tmp_path_factory):
    from app.data.dataset import check_file
    from app.data.store import save_dataset
    from app.workspace import Workspace
    from tests.browser import served_app

    root = tmp_path_factory.mktemp("gate")
    workspace = Workspace.open(root / "workspace")
    source = root / "private-notes.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(4)))
    save_dataset(workspace, check_file(source), source)
    with served_app(workspace.root, args=("--auth", f"{USER}:{PASSWORD}")) as url:
        yield url, workspace


@contextmanager
def logged_in(url: str):
    """A client that logged in through the request the login form sends (a form POST to /login)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("login", data={"username": USER, "password": PASSWORD})
        assert response.status_code == 200, response.text
        yield client


@pytest.mark.slow
def test_the_login_page_shows_no_endpoint_and_no_path(gated_app):
    url, workspace = gated_app
    page = httpx.get(url, timeout=60)
    assert page.status_code == 200 and '"auth_required":true' in page.text
    with logged_in(url) as client:
        names = list(client.get("gradio_api/info").json()["named_endpoints"])
        after_login = client.get("").text
    secrets = [f'"{name}"' for name in names] + [str(workspace.datasets)]
    # after login the page has them all, so their absence before login is the gate's doing
    assert len(names) > 20 and all(secret in after_login for secret in secrets)
    assert [secret for secret in secrets if secret in page.text] == []
    assert len(page.content) < 20_000  # the login form, not the ~1 MB app


@pytest.mark.slow
def test_before_login_the_api_answers_401_and_the_form_loads(gated_app):
    url, _ = gated_app
    with httpx.Client(base_url=url, timeout=60) as client:
        for path in ("config", "gradio_api/info", "gradio_api/runs", "gradio_api/openapi.json", "gradio_api/app_id"):
            assert client.get(path).status_code == 401, path
        files = re.findall(r'(?:src|href)="\./((?:assets|static)/[^"]+)"', client.get("").text)
        assert files and all(client.get(f).status_code == 200 for f in files)
        refused = client.post("login", data={"username": USER, "password": "wrong-password"})
        assert refused.status_code == 400 and client.get("config").status_code == 401


@pytest.mark.slow
def test_after_login_the_page_and_the_api_work(gated_app):
    from gradio_client import Client

    url, _ = gated_app
    with logged_in(url) as client:
        assert client.get("config").status_code == 200
        assert "named_endpoints" in client.get("").text
    # Gradio's client logs in with the same form request, then calls an event through the queue and its stream:
    # the model summary's, found by its widget (handlers have numbered names that shift when a tab adds one)
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    model = next(c["id"] for c in client.config["components"] if c.get("props", {}).get("label") == "Model")
    summary = next(d["api_name"] for d in client.config["dependencies"]
                   if [model, "change"] in map(list, d["targets"]) and d["inputs"] == [model])
    assert "parameters" in client.predict("embedded", api_name=f"/{summary}")


@pytest.mark.slow
def test_a_browser_logs_in_through_the_form(gated_app):
    from tests.browser import browser_missing, chromium_page

    if browser_missing():
        pytest.skip(browser_missing())
    url, _ = gated_app
    with chromium_page() as page:
        page.goto(url)
        page.fill("input[type=password]", PASSWORD)
        page.fill("input[type=text]", USER)
        page.click("button")
        page.get_by_text("Fine-tuning workbench").first.wait_for(timeout=60_000)
