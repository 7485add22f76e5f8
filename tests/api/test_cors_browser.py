"""CORS from a real browser: headless Chromium on a page served from another origin.

Under CI=true a missing Chromium fails these tests (.ci/run installs it); elsewhere they skip.
`evil.example` resolves to 127.0.0.1 inside the browser, so a page can come from a foreign,
non-loopback origin without any network.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.templates import load_template
from llmserve.models.manager import ModelManager
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve
from tests.ui.browser import FLAGS, chromium_or_skip

EVIL_HOST = "evil.example"


@pytest.fixture(autouse=True)
def chromium() -> str:
    """Chromium's path; without it: a failure under CI=true, a skip elsewhere."""
    return chromium_or_skip()


PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
fetch("%(api)s/v1/chat/completions", {
  method: "POST",
  headers: {"Content-Type": "application/json", "Authorization": "Bearer browser-key"},
  body: JSON.stringify({model: "m", messages: [{role: "user", content: "Hello!"}], max_tokens: 2}),
}).then(r => r.json())
  .then(d => { show("reply:" + d.choices[0].message.content); })
  .catch(e => { show("blocked:" + e); });
function show(text) { document.getElementById("out").textContent = text; }
</script></body></html>"""

# A "simple" request: no preflight, so CORS cannot stop it from running, only from being read.
SIMPLE_POST_PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
fetch("%(api)s/v1/model/unload", {method: "POST", mode: "no-cors", body: "{}",
  headers: {"Content-Type": "text/plain"}})
  .then(r => { show("sent:" + r.type); })
  .catch(e => { show("error:" + e); });
function show(text) { document.getElementById("out").textContent = text; }
</script></body></html>"""


def llmserve_app(tmp: Path, origins: list[str], disable_auth: bool = False) -> object:
    settings = Settings(
        api_key=["browser-key"],
        api_tokens_file=tmp / "t.yml",
        cors_origins=origins,
        disable_auth=disable_auth,
    )
    manager = ModelManager(settings)
    manager.register(FakeEngine(), ["m"], load_template(None, "gguf"))
    return create_app(settings, manager)


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, int(httpd.server_address[1])
    finally:
        httpd.shutdown()


def browse(
    page_dir: Path,
    page_port: int,
    api: RunningServer,
    page_host: str = "127.0.0.1",
    page: str = PAGE,
) -> str:
    """What the page at http://page_host:page_port shows after its script ran."""
    (page_dir / "index.html").write_text(page % {"api": api.url})
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                chromium_or_skip(),
                *FLAGS,
                f"--host-resolver-rules=MAP {EVIL_HOST} 127.0.0.1",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"http://{page_host}:{page_port}/index.html",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    found = re.search(r'<pre id="out">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stdout + result.stderr
    return found.group(1)


def test_cross_origin_fetch_with_preflight_works(
    page_server: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    page_dir, page_port = page_server
    app = llmserve_app(tmp_path_factory.mktemp("cors"), ["*"])
    with serve(app) as api:  # type: ignore[arg-type]
        shown = browse(page_dir, page_port, api)
    assert shown.startswith("reply:alpha beta")


def test_origin_not_allowed_is_blocked_by_the_browser(
    page_server: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    page_dir, page_port = page_server
    app = llmserve_app(tmp_path_factory.mktemp("cors"), ["http://127.0.0.1:1"])
    with serve(app) as api:  # type: ignore[arg-type]
        shown = browse(page_dir, page_port, api)
    assert shown.startswith("blocked:")


def test_auth_off_admits_a_loopback_page(
    page_server: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    page_dir, page_port = page_server
    app = llmserve_app(tmp_path_factory.mktemp("cors"), [], disable_auth=True)
    with serve(app) as api:  # type: ignore[arg-type]
        shown = browse(page_dir, page_port, api, page_host="localhost")
    assert shown.startswith("reply:alpha beta")


def test_auth_off_blocks_a_page_on_a_foreign_origin(
    page_server: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    page_dir, page_port = page_server
    app = llmserve_app(tmp_path_factory.mktemp("cors"), [], disable_auth=True)
    with serve(app) as api:  # type: ignore[arg-type]
        shown = browse(page_dir, page_port, api, page_host=EVIL_HOST)
    assert shown.startswith("blocked:")


def test_auth_off_refuses_a_foreign_pages_simple_post(
    page_server: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    page_dir, page_port = page_server
    app = llmserve_app(tmp_path_factory.mktemp("cors"), [], disable_auth=True)
    with serve(app) as api:  # type: ignore[arg-type]
        shown = browse(page_dir, page_port, api, page_host=EVIL_HOST, page=SIMPLE_POST_PAGE)
        models = httpx.get(api.url + "/v1/models").json()
        metrics = httpx.get(api.url + "/metrics").text
    assert shown == "sent:opaque"  # the browser sent it; the server refused it
    assert [m["id"] for m in models["data"]] == ["m"]
    assert 'status="403"' in metrics
