"""The console's "Keys & usage" tab in Debian's Chromium, on a real server and model."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from playwright.sync_api import BrowserContext, Locator, Page, expect

from llmserve.app import create_app
from tests.server import RunningServer, serve
from tests.ui.conftest import ADMIN_KEY, API_KEY, ui_settings
from tests.ui.test_ui_browser import enter_key
from tests.ui.test_ui_http import keyed_app

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LONG = 120_000  # ms: a loaded 2-core machine generates slowly


@pytest.fixture(scope="module")
def keys_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """llmserve on the real default model, file keys, its own usage database."""
    home = tmp_path_factory.mktemp("ui-keys")
    settings = ui_settings(home)
    settings.data_dir = home  # a database of its own, not the session's shared one
    with serve(create_app(settings)) as server:
        yield server


def open_keys_tab(page: Page, server: RunningServer) -> None:
    enter_key(page, server, ADMIN_KEY)
    expect(page.locator("#tab-keys")).to_be_visible()
    page.click("#tab-keys")
    expect(page.locator("#keys")).to_be_visible()
    # The first page start on a busy machine may take a while (Chromium, the playground's init).
    expect(page.locator("#key-table tr[data-source=file]")).not_to_have_count(0, timeout=LONG)


def key_row(page: Page, name: str) -> Locator:
    return page.locator(f"#key-table tr[data-key='{name}']")


def cell(row: Locator, column: int) -> Locator:
    return row.locator("td").nth(column)


def usage_row(page: Page, group: str) -> Locator:
    return page.locator(f"#usage-table tbody tr[data-group='{group}']")


def test_a_key_made_in_the_page_works_is_counted_and_is_revoked(
    context: BrowserContext, page: Page, keys_server: RunningServer
) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=keys_server.url)
    open_keys_tab(page, keys_server)
    page.fill("#new-name", "alice-laptop")
    page.fill("#new-owner", "alice@example.org")
    page.fill("#new-expires-in", "2h")
    page.fill("#new-rpm", "100")
    page.fill("#new-quota-tokens", "50000")
    page.select_option("#new-quota-period", "day")
    page.click("#new-create")
    expect(page.locator("#new-key")).to_be_visible()
    expect(page.locator("#new-key")).to_contain_text("shown only this once")
    expect(page.locator("#keys-status")).to_have_text("Created alice-laptop (api key).")
    key = page.input_value("#new-key-value")
    assert len(key) >= 20 and key not in (API_KEY, ADMIN_KEY)
    page.click("#new-key-copy")
    expect(page.locator("#new-key-copied")).to_have_text("Copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == key

    row = key_row(page, "alice-laptop")
    texts = row.locator("td").all_text_contents()
    assert texts[1:5] == ["alice@example.org", "api", "db", "active"], texts
    assert key.startswith(texts[5].rstrip("…")) and len(texts[5]) > 4, texts
    assert texts[6] == "all" and texts[7] == "rpm 100, quota 50000/day", texts
    assert texts[9] != "never", texts  # expires in 2 h
    expect(row.locator("button.revoke")).to_be_enabled()

    # Dismissed, the key leaves the page; it was never stored by it.
    page.click("#new-key-done")
    expect(page.locator("#new-key")).to_be_hidden()
    assert key not in page.content()
    stored = page.evaluate("JSON.stringify([localStorage, sessionStorage])")
    assert key not in stored

    client = openai.OpenAI(base_url=keys_server.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="ui-a",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=5,
        temperature=0,
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 1

    # Usage by key alone: the key's one request with the reply's token counts.
    page.uncheck("#group-model")
    page.uncheck("#group-day")
    page.fill("#usage-key", "alice-laptop")
    counted = usage_row(page, "alice-laptop")
    for _ in range(100):  # records are written off the request's path
        page.click("#usage-refresh")
        page.wait_for_timeout(100)
        if counted.count() and cell(counted, 1).text_content() == "1":
            break
    usage = counted.locator("td").all_text_contents()
    assert usage[:2] == ["alice-laptop", "1"], usage
    assert usage[2] == str(reply.usage.prompt_tokens), usage
    assert usage[4] == str(reply.usage.completion_tokens), usage
    assert usage[5] == str(reply.usage.total_tokens), usage
    assert page.locator("#usage-table tfoot [data-total=requests]").text_content() == "1"

    # By day: today (UTC); a range after today shows nothing.
    page.check("#group-day")
    page.click("#usage-refresh")
    today = dt.datetime.now(dt.UTC).date()
    expect(usage_row(page, f"alice-laptop|{today.isoformat()}")).to_have_count(1)
    page.fill("#usage-from", (today + dt.timedelta(days=1)).isoformat())
    page.click("#usage-refresh")
    expect(page.locator("#usage-table tbody tr")).to_have_count(0)
    expect(page.locator("#usage-status")).to_have_text("No usage recorded for this selection.")
    expect(page.locator("#usage-table tfoot [data-total=requests]")).to_have_text("0")

    # Revoke, after the confirmation; the key then gets 401.
    row.locator("button.revoke").click()
    expect(row.locator(".confirm")).to_contain_text("Revoke alice-laptop?")
    row.locator("button.confirm-revoke").click()
    expect(page.locator("#keys-status")).to_have_text("Revoked alice-laptop.")
    expect(cell(row, 4)).to_have_text("revoked")
    expect(row.locator("button.revoke")).to_be_disabled()
    answer = httpx.get(
        keys_server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert answer.status_code == 401, answer.text
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model="ui-a", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_cancelling_a_revoke_keeps_the_key(page: Page, keys_server: RunningServer) -> None:
    created = httpx.post(
        keys_server.url + "/v1/keys", headers=ADMIN, json={"name": "bob-kept"}, timeout=60
    )
    assert created.status_code == 201, created.text
    open_keys_tab(page, keys_server)
    row = key_row(page, "bob-kept")
    row.locator("button.revoke").click()
    row.locator(".confirm button", has_text="Cancel").click()
    expect(row.locator("button.revoke")).to_be_enabled()
    page.click("#keys-refresh")
    expect(cell(key_row(page, "bob-kept"), 4)).to_have_text("active")
    answer = httpx.get(
        keys_server.url + "/v1/models",
        headers={"Authorization": f"Bearer {created.json()['key']}"},
        timeout=60,
    )
    assert answer.status_code == 200


def test_file_keys_cannot_be_revoked_and_say_why(page: Page, keys_server: RunningServer) -> None:
    open_keys_tab(page, keys_server)
    rows = page.locator("#key-table tr[data-source=file]")
    roles = sorted(cell(rows.nth(i), 2).text_content() or "" for i in range(rows.count()))
    assert roles == ["admin", "api"], roles  # api_tokens.yml's api_key and admin_key
    for i in range(rows.count()):
        revoke = rows.nth(i).locator("button.revoke")
        expect(revoke).to_be_disabled()
        expect(revoke).to_have_attribute("title", re.compile("api_tokens.yml"))
        expect(rows.nth(i).locator(".why")).to_contain_text("api_tokens.yml")


def test_an_api_error_is_shown_in_the_page(page: Page, keys_server: RunningServer) -> None:
    first = httpx.post(
        keys_server.url + "/v1/keys", headers=ADMIN, json={"name": "dup-name"}, timeout=60
    )
    assert first.status_code == 201, first.text
    open_keys_tab(page, keys_server)
    page.fill("#new-name", "dup-name")
    page.click("#new-create")
    status = page.locator("#keys-status")
    expect(status).to_have_text("Creating the key failed: 409: a key called `dup-name` exists")
    expect(status).to_have_class("status bad")
    expect(page.locator("#new-key")).to_be_hidden()
    # A reserved name: the server's 400 is shown too.
    page.fill("#new-name", "file-mine")
    page.click("#new-create")
    expect(status).to_contain_text("400: `file-mine` is reserved")
    # A group the usage API does not know.
    page.evaluate("document.getElementById('group-key').value = 'colour'")
    page.click("#usage-refresh")
    expect(page.locator("#usage-status")).to_contain_text("400: group_by takes key, model and day")


def test_an_api_key_sees_no_keys_tab(page: Page, keys_server: RunningServer) -> None:
    enter_key(page, keys_server, API_KEY)
    expect(page.locator("#key-status")).to_contain_text("api key accepted")
    expect(page.locator("#tab-keys")).to_be_hidden()
    expect(page.locator("#keys")).to_be_hidden()


def test_the_console_page_references_the_tabs_assets(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("ui-keys-http")
    with serve(keyed_app(tmp)) as server:
        page = httpx.get(server.url + "/ui", timeout=30)
        assert page.status_code == 200
        assert 'id="tab-keys"' in page.text and '<section id="keys"' in page.text
        for needed in ("key-table", "key-create", "new-key-value", "usage-table", "usage-form"):
            assert f'id="{needed}"' in page.text, needed
        app = httpx.get(server.url + "/ui/app.js", timeout=30)
        assert 'from "./keys.js"' in app.text
        keys = httpx.get(server.url + "/ui/keys.js", timeout=30)
        assert keys.status_code == 200
        assert keys.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "script-src 'self'" in keys.headers["content-security-policy"]
        assert "innerHTML" not in keys.text
        for module in re.findall(r'from "\./([\w.]+)"', keys.text):
            imported = httpx.get(f"{server.url}/ui/{module}", timeout=30)
            assert imported.status_code == 200, module
        for call in ('"/v1/keys"', "`/v1/keys/${", "`/v1/usage?${"):  # list/create, revoke, usage
            assert call in keys.text, call
