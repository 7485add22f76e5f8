"""The web UI in a real browser (Debian's Chromium) against real servers on the default model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from llmserve.app import create_admin_app, create_app
from tests.server import RunningServer, serve
from tests.ui.browser import chromium_or_skip
from tests.ui.conftest import ADMIN_KEY, API_KEY, metric, ui_settings
from tests.ui.test_ui_http import ADMIN_KEY as FAKE_ADMIN_KEY
from tests.ui.test_ui_http import keyed_app

ROOT = Path(__file__).resolve().parents[2]
LONG = 120_000  # ms: a loaded 2-core machine generates slowly

# Records every text the newest assistant message shows, as the DOM changes.
WATCH_REPLY = """() => {
  window.seenReplies = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .content');
    if (all.length) window.seenReplies.push(all[all.length - 1].textContent);
  }).observe(document.getElementById('messages'),
             {childList: true, subtree: true, characterData: true});
}"""


def enter_key(page: Page, server: RunningServer, key: str) -> None:
    page.goto(server.url + "/ui")
    expect(page.locator("#key-status")).to_contain_text("needs a key")
    page.fill("#key-input", key)
    page.click("#key-save")


def set_fields(page: Page, max_tokens: int, extra: str = "") -> None:
    page.fill("#sampler-max_tokens", str(max_tokens))
    page.fill("#sampler-temperature", "0")
    if extra:
        page.locator("details", has_text="Structured output").locator("summary").click()
        page.fill("#extra-json", extra)


def test_a_chat_reply_streams_in(page: Page, ui_server: RunningServer) -> None:
    enter_key(page, ui_server, API_KEY)
    expect(page.locator("#key-status")).to_contain_text("api key accepted")
    expect(page.locator("#tab-admin")).to_be_hidden()  # an API key sees no admin console
    expect(page.locator("#model-select option")).to_have_count(1)
    set_fields(page, 48, '{"ignore_eos": true}')
    page.evaluate(WATCH_REPLY)
    page.fill("#chat-input", "Tell me a story about a cat.")
    page.keyboard.press("Enter")
    expect(page.locator(".msg.user .content")).to_have_text("Tell me a story about a cat.")
    done = page.locator(".msg.assistant[data-state=done]")
    expect(done).to_have_count(1, timeout=LONG)
    final = done.locator(".content").text_content() or ""
    seen: list[str] = page.evaluate("window.seenReplies")
    partial = [text for text in dict.fromkeys(seen) if text and text != final]
    assert len(partial) >= 2, seen  # at least two intermediate states before the end
    assert all(final.startswith(text.rstrip()[:10]) for text in partial[:3])
    meta = done.locator(".meta").text_content() or ""
    assert "48 completion tokens" in meta and "TTFT" in meta and "tok/s" in meta, meta
    # The conversation survives a reload (localStorage); the key stays in sessionStorage only.
    page.reload()
    expect(page.locator(".msg.user")).to_have_text(["userTell me a story about a cat.Edit"])
    assert page.evaluate("Object.keys(localStorage)") == ["llmserve.conversations"]
    assert API_KEY not in page.evaluate("JSON.stringify(localStorage)")
    assert page.evaluate("sessionStorage.getItem('llmserve.key')") == API_KEY
    assert API_KEY not in page.url


def test_stop_ends_the_generation_on_the_server(page: Page, ui_server: RunningServer) -> None:
    enter_key(page, ui_server, API_KEY)
    expect(page.locator("#tab-chat")).to_be_visible()
    set_fields(page, 1500, '{"ignore_eos": true}')
    page.fill("#chat-input", "Count from one to one thousand.")
    page.click("#send")
    streaming = page.locator(".msg.assistant[data-state=streaming] .content")
    expect(streaming).not_to_have_text("", timeout=LONG)
    assert metric(ui_server, "llmserve_running_sequences") >= 1
    page.click("#stop")
    expect(page.locator(".msg.assistant[data-state=stopped]")).to_have_count(1)
    deadline = time.monotonic() + 60
    while metric(ui_server, "llmserve_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(ui_server, "llmserve_running_sequences") == 0
    expect(page.locator("#send")).to_be_enabled()


def test_a_wrong_key_gets_a_clear_message(page: Page, ui_server: RunningServer) -> None:
    enter_key(page, ui_server, "not-a-key")
    status = page.locator("#key-status")
    expect(status).to_contain_text("The server refused this key (401)")
    expect(status).to_have_class("status bad")
    expect(page.locator("#tabs")).to_be_hidden()
    expect(page.locator("#chat")).to_be_hidden()


@pytest.fixture
def admin_server(tmp_path: Path) -> Iterator[RunningServer]:
    with serve(create_app(ui_settings(tmp_path))) as server:
        yield server


def test_the_admin_console_loads_and_unloads_with_progress(
    page: Page, admin_server: RunningServer
) -> None:
    enter_key(page, admin_server, ADMIN_KEY)
    expect(page.locator("#tab-admin")).to_be_visible()
    page.click("#tab-admin")
    spare = page.locator("#model-table tr[data-model=ui-b]")
    expect(spare.locator("td").nth(1)).to_have_text("available")
    expect(page.locator("#model-table tr[data-model=ui-a] td").nth(1)).to_have_text("loaded")
    switch_adapter_preset_and_template(page, admin_server)
    spare.get_by_role("button", name="Load").click()
    progress = page.locator("#load-progress")
    expect(progress).to_have_attribute("data-percent", "100", timeout=LONG)
    expect(page.locator("#load-label")).to_contain_text("100%")
    expect(spare.locator("td").nth(1)).to_have_text("loaded", timeout=LONG)
    expect(page.locator("#admin-status")).to_contain_text("loaded ui-b")
    spare.get_by_role("button", name="Unload").click()
    expect(spare.locator("td").nth(1)).to_have_text("available", timeout=LONG)
    expect(page.locator("#model-table td.state-loaded")).to_have_count(0)
    # The charts and the recent requests come from /metrics and /v1/requests/recent.
    expect(page.locator("#charts canvas")).to_have_count(6)
    expect(page.locator("#recent-table tbody")).to_contain_text("/v1/model/load")
    expect(page.locator("#recent-table tbody")).to_contain_text("/v1/model/unload")


def switch_adapter_preset_and_template(page: Page, server: RunningServer) -> None:
    """Apply the LoRA, switch to the preset and the template, each checked through the API."""
    lora = page.locator("#lora-list li", has_text="smol-lora")
    lora.locator("input").fill("0.5")
    lora.get_by_role("button", name="Apply").click()
    expect(lora).to_contain_text("smol-lora (active)", timeout=LONG)
    page.select_option("#preset-select", "cool")
    page.click("#preset-switch")
    expect(page.locator("#admin-status")).to_contain_text("cool")
    page.select_option("#template-select", "plain")
    page.click("#template-switch")
    expect(page.locator("#admin-status")).to_contain_text("plain")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    loras = httpx.get(server.url + "/v1/loras", headers=admin).json()["data"]
    assert [(x["id"], x["scaling"], x["active"]) for x in loras] == [("smol-lora", 0.5, True)]
    presets = httpx.get(server.url + "/v1/sampling/overrides", headers=admin).json()
    assert presets["selected_preset"] == "cool"
    assert (
        httpx.get(server.url + "/v1/templates", headers=admin)
        .json()["active"]
        .endswith("plain.jinja")
    )


def test_the_screenshot_script_makes_both_pictures(tmp_path: Path) -> None:
    chromium_or_skip()
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "screenshots.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("ui-playground.png", "ui-admin.png", "ui-keys.png"):
        picture = (tmp_path / name).read_bytes()
        assert picture.startswith(b"\x89PNG\r\n\x1a\n") and len(picture) > 10_000, name


SCHEMA = '{"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}'
TOOLS = """[{"type": "function", "function": {"name": "get_weather",
  "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
  "required": ["city"]}}}]"""
FORCE = '{"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}'


def stored_messages(page: Page) -> list[dict[str, object]]:
    """The current conversation's messages as the page keeps them in localStorage."""
    messages: list[dict[str, object]] = page.evaluate(
        "JSON.parse(localStorage.getItem('llmserve.conversations'))[0].messages"
    )
    return messages


def chat(page: Page, text: str) -> None:
    before = page.locator(".msg.assistant").count()
    page.fill("#chat-input", text)
    page.click("#send")
    expect(page.locator(".msg.assistant")).to_have_count(before + 1)
    expect(page.locator(".msg.assistant[data-state=streaming]")).to_have_count(0, timeout=LONG)


def test_structured_output_tools_regenerate_edit_and_export(
    page: Page, ui_server: RunningServer, tmp_path: Path
) -> None:
    enter_key(page, ui_server, API_KEY)
    expect(page.locator("#tab-chat")).to_be_visible()
    page.fill("#sampler-max_tokens", "40")
    page.fill("#sampler-temperature", "0")
    page.locator("details", has_text="Structured output").locator("summary").click()
    page.fill("#json-schema", SCHEMA)
    chat(page, "Say hi as JSON.")
    reply = stored_messages(page)[-1]
    assert reply["state"] == "done", reply
    assert isinstance(json.loads(str(reply["content"]))["answer"], str)  # the schema held

    page.fill("#json-schema", "")
    page.fill("#tools-json", TOOLS)
    page.fill("#extra-json", FORCE)
    chat(page, "What is the weather in Paris?")
    call = page.locator(".msg.assistant").last.locator(".tool-call")
    expect(call).to_contain_text("tool call: get_weather")
    arguments = json.loads(call.locator("pre").text_content() or "")
    assert isinstance(arguments["city"], str)

    page.fill("#tools-json", "")
    page.fill("#extra-json", "")
    page.click(".msg.assistant >> nth=-1 >> button.regenerate")
    expect(page.locator(".tool-call")).to_have_count(0)  # the reply with the call is gone
    expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(2, timeout=LONG)
    expect(page.locator(".msg.user")).to_have_count(2)
    assert [m["role"] for m in stored_messages(page)] == ["user", "assistant"] * 2

    page.locator(".msg.user").last.get_by_role("button", name="Edit").click()
    expect(page.locator("#chat-input")).to_have_value("What is the weather in Paris?")
    assert [m["role"] for m in stored_messages(page)] == ["user", "assistant"]

    with page.expect_download() as download:
        page.click("#conv-export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["conversations"][0]["messages"][0]["content"] == "Say hi as JSON."


def test_bad_json_in_a_field_is_shown_not_sent(page: Page, ui_server: RunningServer) -> None:
    enter_key(page, ui_server, API_KEY)
    expect(page.locator("#tab-chat")).to_be_visible()
    page.locator("details", has_text="Structured output").locator("summary").click()
    page.fill("#json-schema", "{not json")
    page.fill("#chat-input", "Hello")
    page.click("#send")
    expect(page.locator("#chat-error")).to_contain_text("The JSON schema is not valid JSON")
    expect(page.locator(".msg.assistant")).to_have_count(0)


def test_a_server_error_is_shown_in_the_reply(page: Page, ui_server: RunningServer) -> None:
    enter_key(page, ui_server, API_KEY)
    expect(page.locator("#tab-chat")).to_be_visible()
    page.fill("#sampler-top_p", "7")  # out of range: the server's 400 names the field
    page.fill("#chat-input", "Hello")
    page.click("#send")
    expect(page.locator(".msg.assistant[data-state=error]")).to_contain_text("top_p")
    expect(page.locator("#chat-error")).to_contain_text("top_p")


MARKDOWN = (
    "# Title\\n**bold** and `code` [ok](https://example.org) [bad](javascript:alert(1))\\n"
    "<img src=x onerror=alert(1)>\\n- one\\n- two\\n```python\\ndef f():  # c\\n    return 1\\n```"
)


def test_markdown_builds_safe_dom_and_highlights_code(page: Page, ui_server: RunningServer) -> None:
    page.goto(ui_server.url + "/ui")
    shape = page.evaluate(
        """async (source) => {
          const { renderMarkdown } = await import('/ui/markdown.js');
          const box = document.createElement('div');
          box.append(renderMarkdown(source));
          return {
            tags: [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
            links: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')),
            keywords: [...box.querySelectorAll('pre .tok-kw')].map((e) => e.textContent),
            comments: [...box.querySelectorAll('pre .tok-com')].map((e) => e.textContent),
            text: box.textContent,
          };
        }""",
        MARKDOWN.replace("\\n", "\n"),
    )
    assert "img" not in shape["tags"] and "<img src=x onerror=alert(1)>" in shape["text"]
    assert {"h3", "strong", "code", "ul", "li", "pre"} <= set(shape["tags"])
    assert shape["links"] == ["https://example.org"]  # javascript: stays text
    assert shape["keywords"] == ["def", "return"] and shape["comments"] == ["# c"]


def test_prometheus_text_is_parsed_in_the_page(page: Page, ui_server: RunningServer) -> None:
    page.goto(ui_server.url + "/ui")
    text = httpx.get(
        ui_server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
    ).text
    parsed = page.evaluate(
        """async (text) => {
          const { parsePrometheus, total } = await import('/ui/api.js');
          const samples = parsePrometheus(text);
          return {
            running: total(samples, 'llmserve_running_sequences'),
            models: samples.llmserve_running_sequences.map((s) => s.labels.model),
            ttftCount: total(samples, 'llmserve_time_to_first_token_seconds_count'),
          };
        }""",
        text,
    )
    assert parsed["running"] == metric(ui_server, "llmserve_running_sequences")
    assert parsed["models"] == ["ui-a"]
    assert parsed["ttftCount"] == metric(ui_server, "llmserve_time_to_first_token_seconds_count")


def test_with_an_admin_port_each_port_shows_its_part(page: Page, tmp_path: Path) -> None:
    main = keyed_app(tmp_path, admin_port=1)  # served below on free ports
    with serve(main) as running, serve(create_admin_app(main)) as admin:
        enter_key(page, running, FAKE_ADMIN_KEY)
        expect(page.locator("#key-status")).to_contain_text("admin key accepted")
        expect(page.locator("#tab-chat")).to_be_visible()
        expect(page.locator("#tab-admin")).to_be_hidden()  # the console is on the admin port
        enter_key(page, admin, FAKE_ADMIN_KEY)
        expect(page.locator("#tab-admin")).to_be_visible()
        expect(page.locator("#tab-chat")).to_be_hidden()
        expect(page.locator("#admin")).to_be_visible()
        expect(page.locator("#model-table tr[data-model=m] td").nth(1)).to_have_text("loaded")


def test_without_admin_api_the_admin_key_sees_no_console(page: Page, tmp_path: Path) -> None:
    with serve(keyed_app(tmp_path, admin_api=False)) as running:
        enter_key(page, running, FAKE_ADMIN_KEY)
        expect(page.locator("#tab-chat")).to_be_visible()
        expect(page.locator("#tab-admin")).to_be_hidden()
        page.goto(running.url + "/ui#admin")
        expect(page.locator("#chat")).to_be_visible()
        expect(page.locator("#admin")).to_be_hidden()
