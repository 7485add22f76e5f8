"""llama.cpp's native server API (/completion, /infill, /props, /slots, /tokenize, ...) on the
real default model, through httpx as llama-server's clients use it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.templates import TemplateError, builtin_template, builtin_template_names
from llmserve.models.defaults import default_model_path
from llmserve.models.manager import ModelManager
from tests.conftest import TEST_SETTINGS
from tests.dialects.conftest import AUTH
from tests.peers.llamacpp_shim.fim import FIM, write_fim_copy
from tests.server import RunningServer, serve

PROMPT = "The three primary colors are"
GREEDY = {"temperature": 0, "seed": 1}
BUILTINS = {"chatml", "llama3", "llama2", "mistral", "gemma", "phi3", "qwen2"}


def post(
    server: RunningServer, path: str, body: Any, headers: dict[str, str] = AUTH
) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=300)


def completion(server: RunningServer, **body: Any) -> dict[str, Any]:
    response = post(server, "/completion", {"prompt": PROMPT, **GREEDY, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def tokenize(server: RunningServer, text: str, headers: dict[str, str] = AUTH) -> list[int]:
    response = post(server, "/tokenize", {"content": text}, headers)
    assert response.status_code == 200, response.text
    tokens: list[int] = response.json()["tokens"]
    return tokens


def stream_events(
    server: RunningServer, body: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every line of an SSE response, and the JSON of its data lines."""
    lines: list[str] = []
    with httpx.stream(
        "POST", server.url + "/completion", json=body, headers=AUTH, timeout=300
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    return lines, events


def admin_headers(server: RunningServer) -> dict[str, str]:
    keys = yaml.safe_load(server.app.state.settings.tokens_path().read_text())
    return {"x-admin-key": keys["admin_key"]}


# ---- /completion ----


def test_completion_shape_and_counts(dialect_server: RunningServer) -> None:
    result = completion(dialect_server, n_predict=8, ignore_eos=True)
    assert isinstance(result["content"], str) and result["content"]
    assert result["stop"] is True
    assert result["stop_type"] == "limit"
    assert result["stopping_word"] == ""
    assert result["tokens"] == []  # only with return_tokens
    assert result["tokens_predicted"] == 8
    assert result["tokens_evaluated"] == len(tokenize(dialect_server, PROMPT))
    assert result["truncated"] is False
    assert result["has_new_line"] == ("\n" in result["content"])
    assert result["model"]
    assert PROMPT in result["prompt"]
    timings = result["timings"]
    assert timings["predicted_n"] == 8
    assert timings["prompt_n"] + timings["cache_n"] == result["tokens_evaluated"]
    assert timings["cache_n"] == result["tokens_cached"]
    assert timings["prompt_ms"] >= 0 and timings["predicted_ms"] >= 0
    settings = result["generation_settings"]
    assert settings["n_predict"] == 8
    assert settings["temperature"] == 0
    assert settings["seed"] == 1
    assert settings["ignore_eos"] is True
    assert "completion_probabilities" not in result


def test_llama_server_defaults_when_unset(dialect_server: RunningServer) -> None:
    result = post(dialect_server, "/completion", {"prompt": PROMPT, "n_predict": 1}).json()
    settings = result["generation_settings"]
    assert (settings["temperature"], settings["top_k"]) == (0.8, 40)
    assert (settings["top_p"], settings["min_p"]) == (0.95, 0.05)
    assert settings["repeat_last_n"] == 64
    assert settings["seed"] == 0xFFFFFFFF  # llama.cpp's "random seed"


def test_return_tokens_detokenize_to_content(dialect_server: RunningServer) -> None:
    result = completion(dialect_server, n_predict=12, return_tokens=True, ignore_eos=True)
    assert len(result["tokens"]) == result["tokens_predicted"] == 12
    assert all(isinstance(t, int) for t in result["tokens"])
    text = post(dialect_server, "/detokenize", {"tokens": result["tokens"]}).json()
    assert text["content"] == text["prompt"] == result["content"]


def test_token_and_mixed_prompts_match_the_text_prompt(dialect_server: RunningServer) -> None:
    by_text = completion(dialect_server, n_predict=6)
    ids = tokenize(dialect_server, PROMPT)
    by_ids = completion(dialect_server, prompt=ids, n_predict=6)
    head, tail = PROMPT.split(" primary ")
    mixed = [head, *tokenize(dialect_server, " primary"), " " + tail]
    by_mix = completion(dialect_server, prompt=mixed, n_predict=6)
    assert by_ids["content"] == by_text["content"]
    assert by_ids["tokens_evaluated"] == len(ids)
    assert by_mix["tokens_evaluated"] > 0
    assert isinstance(by_mix["content"], str)


def test_n_predict_minus_one_runs_to_eos_under_a_grammar(dialect_server: RunningServer) -> None:
    result = completion(dialect_server, n_predict=-1, grammar='root ::= "yes" | "no"')
    assert result["content"] in ("yes", "no")
    assert result["stop_type"] == "eos"
    assert result["generation_settings"]["n_predict"] == -1
    assert result["generation_settings"]["grammar"].startswith("root")


def test_n_predict_zero_generates_nothing(dialect_server: RunningServer) -> None:
    result = completion(dialect_server, n_predict=0)
    assert result["content"] == ""
    assert result["tokens_predicted"] == 0
    assert result["tokens_evaluated"] == len(tokenize(dialect_server, PROMPT))


def test_stop_word_is_reported(dialect_server: RunningServer) -> None:
    free = completion(dialect_server, n_predict=16, ignore_eos=True)["content"]
    words = [w for w in free.split() if len(w) > 3]
    assert words, free
    word = words[0]
    stopped = completion(dialect_server, n_predict=16, stop=[word], ignore_eos=True)
    assert stopped["stop_type"] == "word"
    assert stopped["stopping_word"] == word
    assert stopped["content"] == free[: free.index(word)]


def test_json_schema_constrains_the_output(dialect_server: RunningServer) -> None:
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["color"],
    }
    result = completion(dialect_server, n_predict=-1, json_schema=schema)
    assert json.loads(result["content"])["color"] in ("red", "blue")


def test_n_probs_gives_completion_probabilities(dialect_server: RunningServer) -> None:
    result = completion(dialect_server, n_predict=4, n_probs=3, ignore_eos=True)
    probs = result["completion_probabilities"]
    assert len(probs) == 4
    for entry in probs:
        assert set(entry) >= {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] <= 0
    assert "".join(entry["token"] for entry in probs) == result["content"]


def test_logit_bias_false_bans_a_token(dialect_server: RunningServer) -> None:
    first = completion(dialect_server, n_predict=1, return_tokens=True)["tokens"][0]
    for bias in ([[first, False]], {str(first): False}):
        banned = completion(dialect_server, n_predict=1, return_tokens=True, logit_bias=bias)
        assert banned["tokens"][0] != first
        assert banned["generation_settings"]["logit_bias"] == []


def test_logit_bias_by_text_and_number(dialect_server: RunningServer) -> None:
    target = tokenize(dialect_server, " banana")
    result = completion(
        dialect_server, n_predict=1, return_tokens=True, logit_bias=[[" banana", 100.0]]
    )
    assert result["tokens"][0] in target
    assert [t for t, _ in result["generation_settings"]["logit_bias"]] == sorted(target)


def test_stream_lines_as_llama_server_sends_them(dialect_server: RunningServer) -> None:
    body = {"prompt": PROMPT, **GREEDY, "n_predict": 10, "stream": True, "ignore_eos": True}
    lines, events = stream_events(dialect_server, body)
    assert all(line.startswith("data: {") or line == "" for line in lines), lines
    assert not any("[DONE]" in line for line in lines)
    *parts, final = events
    assert parts and all(e["stop"] is False for e in parts)
    assert all(e["tokens"] and all(isinstance(t, int) for t in e["tokens"]) for e in parts)
    assert final["stop"] is True and final["stop_type"] == "limit"
    assert final["content"] == ""
    assert final["timings"]["predicted_n"] == 10
    assert final["generation_settings"]["n_predict"] == 10
    whole = completion(dialect_server, n_predict=10, ignore_eos=True)
    assert "".join(e["content"] for e in events) == whole["content"]


def test_stream_disconnect_frees_the_slot(dialect_server: RunningServer) -> None:
    body = {"prompt": PROMPT, "n_predict": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", dialect_server.url + "/completion", json=body, headers=AUTH, timeout=300
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    admin = admin_headers(dialect_server)
    deadline = time.monotonic() + 60  # a bound against hangs, not a timing assertion
    busy = True
    while busy and time.monotonic() < deadline:
        slots = httpx.get(dialect_server.url + "/slots", headers=admin, timeout=30).json()
        busy = any(slot["is_processing"] for slot in slots)
        time.sleep(0.1)
    assert not busy


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": PROMPT, "n_predict": "many"}, "n_predict"),
        ({"prompt": PROMPT, "n_predict": -3}, "n_predict"),
        ({"prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"prompt": PROMPT, "repeat_penalty": 0}, "repeat_penalty"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({"prompt": [[1, 2], 3]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [PROMPT, ""]}, "prompt"),
        ({"prompt": {"prompt_string": PROMPT, "multimodal_data": ["aGk="]}}, "prompt"),
        ({"prompt": {"multimodal_data": ["aGk="]}}, "prompt"),
        ({"prompt": PROMPT, "logit_bias": [[10**9, 1.0]]}, "logit_bias"),
        ({"prompt": PROMPT, "logit_bias": [[5, True]]}, "logit_bias"),
        ({"prompt": PROMPT, "logit_bias": "bad"}, "logit_bias"),
        ({"prompt": PROMPT, "grammar": "root ::= ", "json_schema": {}}, "json_schema"),
        ({"prompt": PROMPT, "grammar": "root ::= [unclosed"}, "grammar"),
        ({"prompt": PROMPT, "dynatemp_range": -0.5}, "dynatemp_range"),
        ({"prompt": PROMPT, "n_probs": 10**6}, "n_probs"),
    ],
)
def test_bad_completion_input_is_a_400(
    dialect_server: RunningServer, body: dict[str, Any], param: str
) -> None:
    response = post(dialect_server, "/completion", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert (error.get("param") or "").startswith(param), error


def test_completion_needs_a_key(dialect_server: RunningServer) -> None:
    response = post(dialect_server, "/completion", {"prompt": PROMPT}, headers={})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_openai_completions_path_still_openai(dialect_server: RunningServer) -> None:
    response = post(dialect_server, "/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["object"] == "text_completion"


def test_prompt_object_is_its_prompt_string(dialect_server: RunningServer) -> None:
    by_text = completion(dialect_server, n_predict=5, ignore_eos=True)
    by_object = completion(dialect_server, prompt={"prompt_string": PROMPT}, n_predict=5)
    assert by_object["content"] == by_text["content"]
    assert by_object["tokens_evaluated"] == by_text["tokens_evaluated"]


def test_several_prompts_give_one_result_each(dialect_server: RunningServer) -> None:
    ids = tokenize(dialect_server, PROMPT)
    other = "A list of fruits:"
    prompts = [ids, {"prompt_string": PROMPT}, other]
    results = completion(dialect_server, prompt=prompts, n_predict=5, ignore_eos=True)
    assert isinstance(results, list) and [r["index"] for r in results] == [0, 1, 2]
    alone = completion(dialect_server, prompt=other, n_predict=5, ignore_eos=True)
    assert results[0]["content"] == results[1]["content"]
    assert results[2]["content"] == alone["content"]
    assert results[2]["tokens_evaluated"] == len(tokenize(dialect_server, other))
    assert all(r["tokens_predicted"] == 5 for r in results)
    # Texts alone are several prompts too; token ids mixed with text make one.
    texts = completion(dialect_server, prompt=[PROMPT, other], n_predict=2, ignore_eos=True)
    assert [r["index"] for r in texts] == [0, 1]
    mixed = completion(dialect_server, prompt=[*ids, other], n_predict=2)
    assert isinstance(mixed, dict) and mixed["index"] == 0


def test_several_prompts_stream_by_index(dialect_server: RunningServer) -> None:
    body = {"prompt": [PROMPT, "A list of fruits:"], **GREEDY, "n_predict": 4, "stream": True}
    _, events = stream_events(dialect_server, {**body, "ignore_eos": True})
    for index in (0, 1):
        mine = [e for e in events if e["index"] == index]
        *parts, final = mine
        assert len(parts) == 4 and all(e["stop"] is False for e in parts)
        assert final["stop"] is True and final["timings"]["predicted_n"] == 4
        whole = completion(
            dialect_server, prompt=body["prompt"][index], n_predict=4, ignore_eos=True
        )
        assert "".join(e["content"] for e in parts) == whole["content"]


def test_post_sampling_probs(dialect_server: RunningServer) -> None:
    body = {"n_predict": 4, "n_probs": 5, "post_sampling_probs": True, "ignore_eos": True}
    result = completion(dialect_server, **body, temperature=1.0, top_k=40, seed=3)
    probs = result["completion_probabilities"]
    assert len(probs) == 4
    assert result["generation_settings"]["post_sampling_probs"] is True
    for entry in probs:
        assert set(entry) == {"id", "token", "bytes", "prob", "top_probs"}
        assert 0.0 < entry["prob"] <= 1.0
        tops = entry["top_probs"]
        assert 1 <= len(tops) <= 5
        assert all(0.0 < t["prob"] <= 1.0 for t in tops)
        assert [t["prob"] for t in tops] == sorted((t["prob"] for t in tops), reverse=True)
        if len(tops) < 5:  # every kept candidate is listed: they share all the probability
            assert sum(t["prob"] for t in tops) == pytest.approx(1.0)
    assert "".join(entry["token"] for entry in probs) == result["content"]
    greedy = completion(dialect_server, **body)["completion_probabilities"]
    assert all(e["prob"] == 1.0 and len(e["top_probs"]) == 1 for e in greedy)
    assert all(e["top_probs"][0]["id"] == e["id"] for e in greedy)


def test_response_fields_select_and_flatten(dialect_server: RunningServer) -> None:
    fields = ["content", "generation_settings/n_predict", "prompt", "no/such"]
    result = completion(dialect_server, n_predict=3, response_fields=fields)
    assert set(result) == {"content", "generation_settings/n_predict", "prompt"}
    assert result["generation_settings/n_predict"] == 3
    assert result["prompt"] == PROMPT
    _, events = stream_events(
        dialect_server,
        {"prompt": PROMPT, **GREEDY, "n_predict": 3, "stream": True, "response_fields": fields},
    )
    assert set(events[-1]) == {"content", "generation_settings/n_predict", "prompt"}


def test_timings_per_token_in_stream(dialect_server: RunningServer) -> None:
    body = {"prompt": PROMPT, **GREEDY, "n_predict": 4, "stream": True, "ignore_eos": True}
    _, plain = stream_events(dialect_server, body)
    assert all("timings" not in e for e in plain[:-1])
    _, timed = stream_events(dialect_server, {**body, "timings_per_token": True})
    parts = timed[:-1]
    assert [e["timings"]["predicted_n"] for e in parts] == [1, 2, 3, 4]
    assert all(e["timings"]["prompt_n"] + e["timings"]["cache_n"] > 0 for e in parts)


def test_n_predict_past_the_context_is_clipped(dialect_server: RunningServer) -> None:
    ctx = dialect_server.app.state.settings.ctx_size
    prompt = tokenize(dialect_server, " the") * (ctx - 6)
    result = completion(dialect_server, prompt=prompt, n_predict=100, ignore_eos=True)
    assert result["tokens_evaluated"] == ctx - 6
    assert result["tokens_predicted"] == 6
    assert result["stop_type"] == "limit"
    assert result["generation_settings"]["n_predict"] == 6


def test_generation_settings_report_unused_adaptive_p(dialect_server: RunningServer) -> None:
    settings = completion(dialect_server, n_predict=1)["generation_settings"]
    assert (settings["adaptive_target"], settings["adaptive_decay"]) == (-1.0, 0.9)


# ---- /tokenize, /detokenize ----


def test_tokenize_llama_cpp_shape(dialect_server: RunningServer) -> None:
    text = "Unicode 媽 and emoji 🤗 too"
    plain = post(dialect_server, "/tokenize", {"content": text}).json()
    assert all(isinstance(t, int) for t in plain["tokens"])
    assert plain["count"] == len(plain["tokens"])
    pieces = post(dialect_server, "/tokenize", {"content": text, "with_pieces": True}).json()
    assert [p["id"] for p in pieces["tokens"]] == plain["tokens"]
    assert all(set(p) == {"id", "piece"} and p["piece"] for p in pieces["tokens"])
    ascii_pieces = post(
        dialect_server, "/tokenize", {"content": "plain words here", "with_pieces": True}
    ).json()["tokens"]
    assert "".join(p["piece"] for p in ascii_pieces) == "plain words here"
    back = post(dialect_server, "/detokenize", {"tokens": plain["tokens"]}).json()
    assert back["content"] == back["prompt"] == text


def test_tokenize_mixed_content_and_special_flags(dialect_server: RunningServer) -> None:
    ids = tokenize(dialect_server, "Hello world")
    mixed = post(
        dialect_server, "/tokenize", {"content": ["Hello", *tokenize(dialect_server, " world")]}
    )
    assert mixed.json()["tokens"] == ids
    # llama.cpp adds no special tokens unless asked; vLLM's prompt adds them by default.
    vllm = post(dialect_server, "/tokenize", {"prompt": "Hello world"}).json()
    assert vllm["max_model_len"] == TEST_SETTINGS["ctx_size"]
    asked = post(dialect_server, "/tokenize", {"content": "Hello world", "add_special": True})
    assert asked.json()["tokens"] == vllm["tokens"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"content": "x", "prompt": "x"}, "content"),
        ({}, "prompt"),
        ({"content": [10**9]}, "content"),
        ({"content": "x", "parse_special": False}, "parse_special"),
        ({"content": {"text": "x"}}, "content"),
    ],
)
def test_bad_tokenize_input_is_a_400(
    dialect_server: RunningServer, body: dict[str, Any], param: str
) -> None:
    response = post(dialect_server, "/tokenize", body)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"] or "").startswith(param)


# ---- /apply-template ----


def test_apply_template_is_the_prompt_chat_renders(dialect_server: RunningServer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
    ]
    prompt = post(dialect_server, "/apply-template", {"messages": messages}).json()["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.")
    assert prompt.endswith("<|im_start|>assistant\n")
    chat_ids = post(dialect_server, "/tokenize", {"messages": messages}).json()["tokens"]
    assert tokenize(dialect_server, prompt) == chat_ids
    chat = post(
        dialect_server,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 1, "temperature": 0},
    ).json()
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)
    # A trailing assistant message is continued, as the chat route does.
    more = [*messages, {"role": "assistant", "content": "Blue is"}]
    cont = post(dialect_server, "/apply-template", {"messages": more}).json()["prompt"]
    assert cont.endswith("<|im_start|>assistant\nBlue is")


def test_apply_template_bad_input(dialect_server: RunningServer) -> None:
    for body in ({}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}):
        response = post(dialect_server, "/apply-template", body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"].startswith("messages")


# ---- /props, /slots ----


def test_props(dialect_server: RunningServer) -> None:
    props = httpx.get(dialect_server.url + "/props", headers=AUTH, timeout=30).json()
    assert props["total_slots"] == TEST_SETTINGS["parallel"]
    defaults = props["default_generation_settings"]
    assert defaults["n_ctx"] == TEST_SETTINGS["ctx_size"]
    assert defaults["params"]["temperature"] == 0.8
    assert defaults["params"]["n_predict"] == -1
    assert props["model_path"].endswith(".gguf")
    assert "<|im_start|>" in props["chat_template"]
    assert props["bos_token"] == "<|im_start|>"
    assert props["eos_token"] == "<|im_end|>"
    assert props["build_info"].startswith("llmserve")
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}


def test_slots_need_the_admin_key(dialect_server: RunningServer) -> None:
    url = dialect_server.url + "/slots"
    assert httpx.get(url, timeout=30).status_code == 401
    denied = httpx.get(url, headers=AUTH, timeout=30)
    assert denied.status_code == 403
    assert denied.json()["error"]["type"] == "permission_error"
    slots = httpx.get(url, headers=admin_headers(dialect_server), timeout=30).json()
    assert [slot["id"] for slot in slots] == list(range(TEST_SETTINGS["parallel"]))
    for slot in slots:
        assert slot["n_ctx"] == TEST_SETTINGS["ctx_size"]
        assert isinstance(slot["is_processing"], bool)


# ---- /infill ----


def test_infill_without_fim_tokens_names_them(dialect_server: RunningServer) -> None:
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "prompt": "    return"}
    response = post(dialect_server, "/infill", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "infill_not_supported"
    for name in ("prefix", "suffix", "middle"):
        assert name in error["message"]


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """llmserve on a copy of the default model that has FIM tokens, with the gemma template."""
    root = tmp_path_factory.mktemp("fim")
    model = root / "smol-fim.gguf"
    write_fim_copy(default_model_path(), model, FIM)
    settings = Settings(
        model=str(model),
        chat_template="gemma",
        disable_auth=True,
        api_tokens_file=root / "api_tokens.yml",
        **{**TEST_SETTINGS, "parallel": 2},
    )
    with serve(create_app(settings)) as server:
        yield server


def test_infill_assembles_the_fim_prompt(fim_server: RunningServer) -> None:
    body = {
        "input_extra": [{"filename": "util.py", "text": "def helper():\n    pass\n"}],
        "input_prefix": "def add(a, b):\n",
        "prompt": "    return",
        "input_suffix": "\n\nprint(add(1, 2))\n",
        "n_predict": 4,
        "temperature": 0,
    }
    response = post(fim_server, "/infill", body, headers={})
    assert response.status_code == 200, response.text
    result = response.json()

    def ids(text: str) -> list[int]:
        return tokenize(fim_server, text, headers={})

    expected = [
        *ids("\n\n--- util.py ---\n\n" + "def helper():\n    pass\n"),
        FIM["fim_pre"],
        *ids(body["input_prefix"]),
        *ids(body["prompt"]),
        FIM["fim_suf"],
        *ids(body["input_suffix"]),
        FIM["fim_mid"],
    ]
    assert result["tokens_evaluated"] == len(expected)
    detok = post(fim_server, "/detokenize", {"tokens": expected}, headers={}).json()
    assert result["prompt"] == detok["content"]
    assert "<gh_stars>" in result["prompt"]  # token 7 rendered: the FIM prefix is in
    assert result["tokens_predicted"] <= 4


@pytest.mark.parametrize(
    "extra", [{}, {"filename": "ok"}, {"filename": 123}, {"filename": 123, "text": "abc"}]
)
def test_infill_bad_input_extra(fim_server: RunningServer, extra: dict[str, Any]) -> None:
    body = {"input_extra": [extra], "input_prefix": "a", "input_suffix": "b"}
    response = post(fim_server, "/infill", body, headers={})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("input_extra")


def test_infill_requires_prefix_and_suffix(fim_server: RunningServer) -> None:
    response = post(fim_server, "/infill", {"input_prefix": "a"}, headers={})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input_suffix"


# ---- built-in chat templates ----


def test_builtin_template_serves_apply_template_and_props(fim_server: RunningServer) -> None:
    props = httpx.get(fim_server.url + "/props", timeout=30).json()
    assert props["chat_template"] == builtin_template("gemma")
    messages = [{"role": "user", "content": "Hi"}]
    prompt = post(fim_server, "/apply-template", {"messages": messages}, headers={}).json()
    turns = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert prompt["prompt"] == props["bos_token"] + turns  # gemma writes BOS itself


def test_builtin_names_are_shipped() -> None:
    assert set(builtin_template_names()) >= BUILTINS
    assert builtin_template("no-such-template") is None
    assert builtin_template("../templates") is None


def _info() -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(bos_token="<s>", eos_token="</s>", chat_template=None)
    )


def test_a_file_of_a_builtin_name_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine: Any = _info()
    builtin = ModelManager._template(engine, Path("llama3"))
    assert builtin.origin == "builtin:llama3"
    assert builtin.source == builtin_template("llama3")
    (tmp_path / "llama3").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    own = ModelManager._template(engine, Path("llama3"))
    assert own.origin == "file:llama3"
    with pytest.raises(TemplateError):
        ModelManager._template(engine, Path("not-a-template-or-file"))


def test_sampling_presets_apply(fim_server: RunningServer) -> None:
    switch = {"overrides": {"max_tokens": {"override": 2, "force": True}}}
    assert post(fim_server, "/v1/sampling/override/switch", switch, headers={}).status_code == 200
    try:
        result = post(
            fim_server,
            "/completion",
            {"prompt": PROMPT, "n_predict": 8, "ignore_eos": True, **GREEDY},
            headers={},
        ).json()
    finally:
        post(fim_server, "/v1/sampling/override/unload", {}, headers={})
    assert result["tokens_predicted"] == 2
    assert result["generation_settings"]["n_predict"] == 2


def test_embedding_route_serves_llama_servers_shape(dialect_server: RunningServer) -> None:
    url = dialect_server.url + "/embedding"
    one = httpx.post(url, json={"content": "The cat sat on the mat."}, headers=AUTH, timeout=300)
    assert one.status_code == 200, one.text
    [entry] = one.json()
    assert entry["index"] == 0 and len(entry["embedding"]) == 1
    vector = entry["embedding"][0]
    assert abs(sum(x * x for x in vector) - 1) < 1e-3  # embd_normalize 2 (L2) by default
    texts = ["The cat sat on the mat.", "Revenue rose."]
    many = httpx.post(url, json={"content": texts, "embd_normalize": -1}, headers=AUTH, timeout=300)
    assert [e["index"] for e in many.json()] == [0, 1]
    raw = many.json()[0]["embedding"][0]
    assert abs(sum(x * x for x in raw) - 1) > 1e-3  # -1: not normalized
    bad = httpx.post(url, json={"content": "x", "embd_normalize": 1}, headers=AUTH, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("embd_normalize")
