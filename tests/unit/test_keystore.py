"""KeyStore unit tests: constant-time comparison against every key, whatever matches."""

from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path

import pytest
import yaml

from llmserve import auth
from llmserve.auth import KeyStore, Permission


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    path = tmp_path / "api_tokens.yml"
    path.write_text(yaml.safe_dump({"api_key": ["k1", "k2"], "admin_key": "adm"}))
    return KeyStore(path, ["cli"], disabled=False)


def test_permissions(store: KeyStore) -> None:
    assert store.permission([]) is Permission.NONE
    assert store.permission(["nope"]) is Permission.NONE
    assert store.permission(["k2"]) is Permission.API
    assert store.permission(["cli"]) is Permission.API
    assert store.permission(["adm"]) is Permission.ADMIN
    assert store.permission(["nope", "adm"]) is Permission.ADMIN


@pytest.mark.parametrize("presented", ["k1", "adm", "nope", "k"])
def test_every_key_is_compared_in_constant_time(
    store: KeyStore, presented: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    store.permission([presented])
    # Four keys (k1, k2, cli, adm): the same work whether the key matches first, last or never.
    assert len(calls) == 4


def test_disabled_grants_admin(tmp_path: Path) -> None:
    assert KeyStore(tmp_path / "none.yml", [], disabled=True).permission([]) is Permission.ADMIN


def racing_stores(path: Path, count: int) -> list[KeyStore]:
    """`count` stores (as separate servers would have) ensuring one file at the same moment."""
    stores = [KeyStore(path, [], disabled=False) for _ in range(count)]
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def start(store: KeyStore) -> None:
        barrier.wait()
        try:
            store.ensure_file()
        except BaseException as exc:  # reported below, with the failing thread's exception
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return stores


def test_servers_starting_at_once_share_one_file(tmp_path: Path) -> None:
    for attempt in range(20):
        path = tmp_path / str(attempt) / "api_tokens.yml"
        stores = racing_stores(path, 4)
        keys = {store.keys() for store in stores}
        assert len(keys) == 1 and stores[0].problem is None
        (only,) = keys
        assert len(only.api) == 1 and len(only.admin) == 1
        assert yaml.safe_load(path.read_text()) == {
            "api_key": only.api[0],
            "admin_key": only.admin[0],
        }
        assert sorted(p.name for p in path.parent.iterdir()) == ["api_tokens.yml"]  # no temp left
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_file_that_appears_after_the_check_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "api_tokens.yml"
    first = KeyStore(path, [], disabled=False)
    first.ensure_file()
    # The second server looked before the first one wrote the file.
    monkeypatch.setattr(Path, "exists", lambda self: False)
    second = KeyStore(path, [], disabled=False)
    second.ensure_file()
    assert second.keys() == first.keys()


def test_new_file_is_never_seen_half_written(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.append(path.read_text())
            except FileNotFoundError:
                continue
            path.unlink()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(200):
            auth.create_tokens_file(path)
    finally:
        done.set()
        watcher.join()
    assert seen
    assert all(set(yaml.safe_load(text)) == {"api_key", "admin_key"} for text in seen)


@pytest.mark.parametrize(
    "broken",
    [
        b"api_key: [k1, secret-k3\nadmin_key: adm",  # half-written
        b"- just\n- a list\n",
        b"api_key: {nested: map}\n",
        b"api_key: \xff\xfe\n",
        b"",
        b"\t: : :",
        b"admin_key: adm\napi_k\n  - [x",  # cut off: the next line folds into admin_key
    ],
)
def test_broken_file_keeps_the_last_good_keys(
    store: KeyStore, broken: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    assert store.permission(["k1"]) is Permission.API
    store.path.write_bytes(broken)
    with caplog.at_level(logging.ERROR, logger="llmserve.auth"):
        for _ in range(3):
            assert store.permission(["k1"]) is Permission.API
            assert store.permission(["adm"]) is Permission.ADMIN
    assert store.problem is not None and str(store.path) in store.problem
    assert "keeping the last good keys" in store.problem
    assert "secret-k3" not in store.problem and "secret-k3" not in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # once per change
    store.path.write_text(yaml.safe_dump({"api_key": "fixed-key", "admin_key": "adm"}))
    assert store.permission(["fixed-key"]) is Permission.API
    assert store.permission(["k1"]) is Permission.NONE
    assert store.problem is None


def test_file_broken_from_the_first_read_leaves_the_command_line_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text("api_key: [unclosed\n")
    store = KeyStore(path, ["cli"], disabled=False)
    with caplog.at_level(logging.ERROR, logger="llmserve.auth"):
        store.ensure_file()
    assert f"cannot use {path}" in caplog.text and "not valid YAML at line" in caplog.text
    assert store.permission(["cli"]) is Permission.API
    assert store.permission(["unclosed"]) is Permission.NONE
    assert store.problem is not None and "only --api-key keys" in store.problem
