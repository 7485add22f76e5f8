"""How chat messages become prompt text: text parts joined, the final message continued."""

from __future__ import annotations

import pytest

from llmserve.api.common import ChatMessage, TextPart
from llmserve.api.openai.protocol import ChatCompletionRequest
from llmserve.core.continuation import render_continuation
from llmserve.core.errors import InvalidRequestError
from llmserve.core.templates import CHATML_TEMPLATE, ChatTemplate, TemplateError

CHATML = ChatTemplate(CHATML_TEMPLATE, "builtin:chatml")
TRIMMING = ChatTemplate(
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</{{ m['role'] }}>"
    "{% endfor %}",
    "test:trim",
)
TRUNCATING = ChatTemplate(  # rewrites content so that a marker after it would not survive
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'][:10] }}</{{ m['role'] }}>{% endfor %}",
    "test:truncate",
)


def test_text_parts_are_joined_with_newlines() -> None:
    parts = [TextPart(type="text", text="What is"), TextPart(type="text", text="the best book")]
    assert ChatMessage(role="user", content=parts).text() == "What is\nthe best book"
    assert ChatMessage(role="user", content="plain").text() == "plain"
    assert ChatMessage(role="user", content=None).text() == ""


def test_continuation_ends_with_the_final_message() -> None:
    messages = [
        {"role": "user", "content": "The sky is"},
        {"role": "assistant", "content": "The sky is"},
    ]
    text = render_continuation(CHATML, messages)
    assert text == ("<|im_start|>user\nThe sky is<|im_end|>\n<|im_start|>assistant\nThe sky is")
    empty = render_continuation(CHATML, [*messages[:1], {"role": "assistant", "content": ""}])
    assert empty.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_continuation_through_templates_that_rewrite_content() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " Hello "}]
    # Trimming: the template's leading cut stays, the cut comes right after the text's end.
    assert render_continuation(TRIMMING, messages) == "<user>hi</user><assistant>Hello "
    # A marker that does not survive: the cut falls after the last occurrence of the text.
    assert render_continuation(TRUNCATING, messages) == "<user>hi</user><assistant> Hello "


def test_continuation_fails_cleanly_when_the_text_is_not_rendered() -> None:
    dropping = ChatTemplate("{% for m in messages %}{{ m['role'] }};{% endfor %}", "test:drop")
    with pytest.raises(TemplateError) as caught:
        render_continuation(dropping, [{"role": "assistant", "content": "abc"}])
    assert caught.value.param == "messages"


def chat_request(**body: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(body)


def test_which_requests_continue_the_final_message() -> None:
    user = {"role": "user", "content": "q"}
    assistant = {"role": "assistant", "content": "a"}
    assert chat_request(messages=[user, assistant]).continues_final_message()
    assert chat_request(
        messages=[user, assistant], continue_final_message=True
    ).continues_final_message()
    assert not chat_request(messages=[user]).continues_final_message()
    for flags in ({"continue_final_message": False}, {"add_generation_prompt": True}):
        assert not chat_request(messages=[user, assistant], **flags).continues_final_message()
    for bad in (
        {
            "messages": [user, assistant],
            "continue_final_message": True,
            "add_generation_prompt": True,
        },
        {"messages": [user], "continue_final_message": True},
    ):
        with pytest.raises(InvalidRequestError) as caught:
            chat_request(**bad).continues_final_message()
        assert caught.value.param == "continue_final_message"
