"""KeyStore unit tests: constant-time comparison against every key, whatever matches."""

from __future__ import annotations

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
