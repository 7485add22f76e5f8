"""What every dialect shares, on the real model: sampling presets, genkeys scoped by the caller's
key, preset files that are broken, and context errors named in the dialect's own fields."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from llmserve.api.kobold.serving import KoboldServing
from llmserve.app import create_app
from llmserve.config import Settings
from tests.conftest import TEST_SETTINGS
from tests.dialects.conftest import AUTH
from tests.server import RunningServer, serve

KEY_A, KEY_B, ADMIN_KEY = "user-a-key", "user-b-key", "admin-key-d2"
A, B = ({"Authorization": f"Bearer {key}"} for key in (KEY_A, KEY_B))
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
STORY = "Once upon a time"
PRESETS = {
    "cap5.yml": yaml.safe_dump({"max_tokens": {"override": 5, "force": True}}),
    "broken.yml": "max_tokens: {override: 3, force: true\n  temperature: [",
    "force-only.yml": yaml.safe_dump({"temperature": {"force": True}}),
    "not-a-map.yml": yaml.safe_dump([1, 2, 3]),
    "bad-value.yml": yaml.safe_dump({"temperature": {"override": -1, "force": True}}),
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Two API keys and an admin key; Kobold needs a key (the default); presets in a folder."""
    root = tmp_path_factory.mktemp("shared")
    (root / "presets").mkdir()
    for name, text in PRESETS.items():
        (root / "presets" / name).write_text(text)
    tokens = root / "api_tokens.yml"
    tokens.write_text(yaml.safe_dump({"api_key": [KEY_A, KEY_B], "admin_key": ADMIN_KEY}))
    tokens.chmod(0o600)
    settings = Settings(
        api_tokens_file=tokens, sampler_overrides_dir=root / "presets", **TEST_SETTINGS
    )
    with serve(create_app(settings)) as server:
        yield server


def post(
    server: RunningServer, path: str, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def switch(server: RunningServer, body: dict[str, Any]) -> httpx.Response:
    return post(server, "/v1/sampling/override/switch", body, ADMIN)


def selected_preset(server: RunningServer) -> str | None:
    r = httpx.get(server.url + "/v1/sampling/overrides", headers=ADMIN, timeout=30)
    preset: str | None = r.json()["selected_preset"]
    return preset


# ---- item 14: one preset, every dialect ----


def generated_tokens(server: RunningServer) -> dict[str, int]:
    """Completion tokens of a 40-token request in each dialect's own words."""
    chat = post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_completion_tokens": 40,
            "ignore_eos": True,
        },
        A,
    )
    completion = post(
        server, "/v1/completions", {"prompt": STORY, "max_tokens": 40, "ignore_eos": True}, A
    )
    kobold = post(
        server, "/api/v1/generate", {"prompt": STORY, "max_length": 40, "bypass_eos": True}, A
    )
    together = post(
        server, "/inference", {"prompt": STORY, "max_tokens": 40, "ignore_eos": True}, A
    )
    for r in (chat, completion, kobold, together):
        assert r.status_code == 200, r.text
    return {
        "chat": chat.json()["usage"]["completion_tokens"],
        "completions": completion.json()["usage"]["completion_tokens"],
        "kobold": kobold.json()["results"][0]["completion_tokens"],
        "together": together.json()["usage"]["completion_tokens"],
    }


def test_a_forced_preset_caps_every_dialect(keyed: RunningServer) -> None:
    assert set(generated_tokens(keyed).values()) == {40}
    assert switch(keyed, {"preset": "cap5"}).status_code == 200
    try:
        assert generated_tokens(keyed) == dict.fromkeys(
            ("chat", "completions", "kobold", "together"), 5
        )
    finally:
        assert post(keyed, "/v1/sampling/override/unload", {}, ADMIN).status_code == 200
    assert set(generated_tokens(keyed).values()) == {40}


def test_preset_defaults_fill_unset_fields_in_every_dialect(keyed: RunningServer) -> None:
    # A default (not forced) in Kobold's spelling: stored as the shared name, unset fields get it.
    assert switch(keyed, {"overrides": {"max_length": {"override": 3}}}).status_code == 200
    try:
        overrides = httpx.get(keyed.url + "/v1/sampling/overrides", headers=A).json()
        assert set(overrides["overrides"]) == {"max_tokens"}
        kobold = post(keyed, "/api/v1/generate", {"prompt": STORY, "bypass_eos": True}, A)
        assert kobold.json()["results"][0]["completion_tokens"] == 3
        together = post(keyed, "/inference", {"prompt": STORY, "ignore_eos": True}, A)
        assert together.json()["usage"]["completion_tokens"] == 3
        asked = post(
            keyed, "/api/v1/generate", {"prompt": STORY, "max_length": 6, "bypass_eos": True}, A
        )
        assert asked.json()["results"][0]["completion_tokens"] == 6  # the request's value wins
    finally:
        post(keyed, "/v1/sampling/override/unload", {}, ADMIN)


# ---- item 9 (presets): a broken preset file is a 400 naming it; the old preset stays ----


@pytest.mark.parametrize("name", ["broken", "force-only", "not-a-map", "bad-value"])
def test_a_broken_preset_is_a_400_and_keeps_the_old_one(keyed: RunningServer, name: str) -> None:
    assert switch(keyed, {"preset": "cap5"}).status_code == 200
    try:
        r = switch(keyed, {"preset": name})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "preset"
        assert name in error["message"]
        if name == "force-only":
            assert "temperature" in error["message"] and "override" in error["message"]
        assert selected_preset(keyed) == "cap5"
        kobold = post(
            keyed, "/api/v1/generate", {"prompt": STORY, "max_length": 40, "bypass_eos": True}, A
        )
        assert kobold.json()["results"][0]["completion_tokens"] == 5  # still capped
    finally:
        post(keyed, "/v1/sampling/override/unload", {}, ADMIN)


def test_inline_entry_with_force_and_no_override_is_a_400(keyed: RunningServer) -> None:
    r = switch(keyed, {"overrides": {"temperature": {"force": True}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("overrides")
    assert selected_preset(keyed) is None


# ---- item 11: genkeys are scoped by the caller's key ----


async def _wait_for_text(
    client: httpx.AsyncClient, genkey: str, headers: dict[str, str], task: asyncio.Task[Any]
) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert not task.done(), "the generation ended before it could be checked"
        r = await client.post("/api/extra/generate/check", json={"genkey": genkey}, headers=headers)
        text = str(r.json()["results"][0]["text"])
        if text:
            return text
        await asyncio.sleep(0.02)
    raise TimeoutError("no text appeared")


def test_genkeys_are_private_to_the_key_that_started_them(keyed: RunningServer) -> None:
    genkey = "KCPP1234"
    long = {"prompt": STORY, "temperature": 0, "bypass_eos": True, "max_length": 512}

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=keyed.url, timeout=120) as client:

            def check(headers: dict[str, str]) -> Any:
                return client.post(
                    "/api/extra/generate/check", json={"genkey": genkey}, headers=headers
                )

            def abort(headers: dict[str, str]) -> Any:
                return client.post("/api/extra/abort", json={"genkey": genkey}, headers=headers)

            task = asyncio.create_task(
                client.post("/api/v1/generate", json={**long, "genkey": genkey}, headers=A)
            )
            seen_by_a = await _wait_for_text(client, genkey, A, task)
            out = {
                "seen_by_a": seen_by_a,
                "check_b": (await check(B)).json(),
                "abort_b": (await abort(B)).json(),
                "still_running": not task.done(),
                # The same genkey string from another key is another generation: no collision.
                "own_b": await client.post(
                    "/api/v1/generate",
                    json={**long, "max_length": 4, "genkey": genkey},
                    headers=B,
                ),
                "scopes": list(keyed.app.state.kobold.generations),
                "abort_a": (await abort(A)).json(),
            }
            out["long"] = await task
            return out

    out = asyncio.run(main())
    assert out["seen_by_a"]
    assert out["check_b"] == {"results": [{"text": ""}]}
    assert out["abort_b"] == {"success": "false", "done": "false"}
    assert out["still_running"]
    assert out["own_b"].status_code == 200, out["own_b"].text
    assert out["own_b"].json()["results"][0]["completion_tokens"] == 4
    assert out["abort_a"] == {"success": "true", "done": "true"}
    aborted = out["long"].json()["results"][0]
    assert aborted["text"].startswith(out["seen_by_a"]) and aborted["completion_tokens"] < 512
    # The registry holds a fingerprint of the key, never the key itself.
    for ref in out["scopes"]:
        assert ref.scope and KEY_A not in ref.scope and KEY_B not in ref.scope
    assert KEY_A not in repr(out["scopes"])
    serving: KoboldServing = keyed.app.state.kobold
    assert serving.generations == {}


def test_genkeys_are_one_scope_when_kobold_auth_is_off(dialect_server: RunningServer) -> None:
    # kobold_auth: false (SillyTavern's setup): callers have no key to tell them apart.
    genkey = "KCPP4321"
    body = {"prompt": STORY, "temperature": 0, "bypass_eos": True, "max_length": 512}

    async def main() -> tuple[str, dict[str, Any], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=dialect_server.url, timeout=120) as client:
            task = asyncio.create_task(
                client.post("/api/v1/generate", json={**body, "genkey": genkey}, headers=AUTH)
            )
            seen_without_key = await _wait_for_text(client, genkey, {}, task)
            clash = await client.post(
                "/api/v1/generate", json={"prompt": STORY, "genkey": genkey}, headers={}
            )
            abort = await client.post("/api/extra/abort", json={"genkey": genkey})
            return seen_without_key, abort.json(), clash, await task

    seen, abort, clash, long = asyncio.run(main())
    assert seen
    assert clash.status_code == 400 and "genkey" in clash.json()["detail"]["msg"]
    assert abort == {"success": "true", "done": "true"}
    assert long.json()["results"][0]["completion_tokens"] < 512


# ---- item 21: context errors name Together's fields ----


def test_together_context_errors_name_the_right_field(dialect_server: RunningServer) -> None:
    too_long = post(
        dialect_server, "/inference", {"prompt": "hello " * 3000, "max_tokens": 10}, AUTH
    )
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    too_many = post(
        dialect_server, "/inference", {"prompt": "hello " * 1000, "max_tokens": 1500}, AUTH
    )
    assert too_many.status_code == 400, too_many.text
    assert too_many.json()["error"]["param"] == "max_tokens"
