"""Item 12: /metrics labels are route templates; unmatched paths share one label."""

from __future__ import annotations

import re
import secrets

import httpx

from tests.server import RunningServer

ROUTE_LABEL = re.compile(r'^llmserve_requests_total\{[^}]*\broute="([^"]*)"', re.M)


def route_labels(server: RunningServer) -> set[str]:
    return set(ROUTE_LABEL.findall(httpx.get(server.url + "/metrics").text))


def test_random_paths_do_not_grow_the_registry(fake_server: RunningServer) -> None:
    before = route_labels(fake_server)
    with httpx.Client(base_url=fake_server.url) as client:
        for _ in range(200):
            client.get(f"/{secrets.token_hex(6)}/{secrets.token_hex(4)}")
            client.get(f"/v1/models/{secrets.token_hex(6)}")  # a templated route, random ids
    labels = route_labels(fake_server)
    assert "unmatched" in labels
    assert len(labels - before) <= 3, labels - before
    assert all(label == "unmatched" or label.startswith("/") for label in labels)
    assert not any(re.search(r"[0-9a-f]{12}", label) for label in labels), labels


def test_requests_are_counted_per_dialect(fake_server: RunningServer) -> None:
    with httpx.Client(base_url=fake_server.url) as client:
        assert client.get("/api/v1/model").status_code == 200
        assert client.get("/v1/models").status_code == 200
        text = client.get("/metrics").text
    found = re.findall(r'^llmserve_requests_total\{dialect="(\w+)",route="([^"]*)"', text, re.M)
    dialects = {route: dialect for dialect, route in found}
    assert dialects["/api/v1/model"] == "kobold"
    assert dialects["/v1/models"] == "openai"
