"""Tool calling without a model: plans, grammars, the call reader, and tool turns in templates."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmserve.core.errors import InvalidRequestError
from llmserve.core.templates import CHATML_TEMPLATE, load_template
from llmserve.core.tools import (
    ToolCall,
    ToolCallReader,
    ToolChoice,
    ToolFunction,
    ToolPlan,
    ToolStream,
    Turn,
    split_tool_calls,
    template_messages,
    template_tools,
)
from tests.structured import gbnf as constraints
from tests.structured.oracle import GrammarOracle

WEATHER = ToolFunction(
    "get_weather",
    "Weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
)
CLOCK = ToolFunction("get_time")
TOOLS = (WEATHER, CLOCK)


def plan(choice: ToolChoice = ToolChoice.AUTO, **kw: Any) -> ToolPlan:
    return ToolPlan(TOOLS, choice, **kw)


def test_required_grammar_allows_calls_only(oracle: GrammarOracle) -> None:
    g = constraints.tool_grammar(plan(ToolChoice.REQUIRED))
    assert g is not None
    assert oracle.accepts(g, '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}')
    assert oracle.accepts(g, '{"name": "get_time", "arguments": {}}')
    assert oracle.accepts(g, '[{"name": "get_time", "arguments": {}}]')  # parallel calls
    assert not oracle.accepts(g, '{"name": "get_time", "arguments": {"x": 1}}')
    assert not oracle.accepts(g, '{"name": "nope", "arguments": {}}')
    assert not oracle.accepts(g, "Sure!")


def test_named_function_grammar(oracle: GrammarOracle) -> None:
    g = constraints.tool_grammar(plan(ToolChoice.FUNCTION, function="get_weather"))
    assert g is not None
    assert oracle.accepts(g, '{"name": "get_weather", "arguments": {"city": "X", "unit": "f"}}')
    assert not oracle.accepts(g, '{"name": "get_time", "arguments": {}}')
    assert not oracle.accepts(g, '[{"name": "get_weather", "arguments": {}}]')


def test_no_parallel_calls(oracle: GrammarOracle) -> None:
    g = constraints.tool_grammar(plan(ToolChoice.REQUIRED, parallel=False))
    assert g is not None
    assert not oracle.accepts(g, '[{"name": "get_time", "arguments": {}}]')


def test_auto_and_none_need_no_grammar() -> None:
    assert constraints.tool_grammar(plan()) is None
    assert constraints.tool_grammar(plan(ToolChoice.NONE)) is None
    assert not plan(ToolChoice.NONE).active


def test_tool_definitions_that_break_the_plan() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        ToolPlan((CLOCK, CLOCK))
    assert caught.value.param == "tools"
    with pytest.raises(InvalidRequestError) as caught:
        ToolPlan(TOOLS, ToolChoice.FUNCTION, "missing")
    assert caught.value.param == "tool_choice"
    bad = ToolFunction("f", None, {"type": "object", "properties": {"n": {"multipleOf": 2}}})
    with pytest.raises(InvalidRequestError) as caught:
        constraints.tool_grammar(ToolPlan((CLOCK, bad), ToolChoice.REQUIRED))
    assert caught.value.param == "tools[1].function.parameters"
    assert "`multipleOf`" in caught.value.message


def test_tool_schemas_with_same_named_defs_do_not_collide(oracle: GrammarOracle) -> None:
    def tool(name: str, inner: dict[str, Any]) -> ToolFunction:
        return ToolFunction(
            name,
            None,
            {
                "$defs": {"Item": inner},
                "type": "object",
                "properties": {"item": {"$ref": "#/$defs/Item"}},
                "required": ["item"],
            },
        )

    both = ToolPlan(
        (tool("a", {"type": "integer"}), tool("b", {"type": "boolean"})), ToolChoice.REQUIRED
    )
    g = constraints.tool_grammar(both)
    assert g is not None
    assert oracle.accepts(g, '{"name": "a", "arguments": {"item": 3}}')
    assert oracle.accepts(g, '{"name": "b", "arguments": {"item": true}}')
    assert not oracle.accepts(g, '{"name": "a", "arguments": {"item": true}}')


def test_reader_streams_arguments_as_written() -> None:
    text = '{"name": "get_weather", "arguments": {"city": "S\\"x}", "unit": "c"}}'
    reader = ToolCallReader()
    deltas = [d for char in text for d in reader.feed(char)]
    assert deltas[0].id is not None and deltas[0].id.startswith("call_")
    assert deltas[0].name == "get_weather"
    assert "".join(d.arguments for d in deltas) == '{"city": "S\\"x}", "unit": "c"}'
    assert reader.complete and not reader.failed
    assert {d.index for d in deltas} == {0}


def test_reader_reads_an_array_of_calls() -> None:
    text = (
        '[{"name": "get_time", "arguments": {}}, {"arguments": {"a": [1]}, "name": "get_weather"}]'
    )
    reader = ToolCallReader()
    deltas = reader.feed(text)
    calls = reader.calls()
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert [c.arguments for c in calls] == ["{}", '{"a": [1]}']
    assert [d.index for d in deltas if d.id] == [0, 1]
    assert reader.complete


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_time", "arguments": {}}',
        '  <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        '```json\n{"name": "get_time", "parameters": {}}\n```',
        '[TOOL_CALLS][{"name": "get_time", "arguments": {}}]',
        '{"name": "get_time", "arguments": "{}"}',
    ],
)
def test_auto_output_that_is_a_call(text: str) -> None:
    content, calls = split_tool_calls(text, plan())
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {})]


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny.",
        '{"name": "unknown", "arguments": {}}',
        '{"name": "get_time", "arguments": {}} and more',
        '{"name": "get_time", "arguments": [1]}',
        '{"name": "get_time"',
    ],
)
def test_auto_output_that_is_not_a_call(text: str) -> None:
    assert split_tool_calls(text, plan()) == (text, [])


def test_named_choice_only_accepts_that_function_in_auto_parsing() -> None:
    weather_only = plan(ToolChoice.FUNCTION, function="get_weather")
    text = '{"name": "get_time", "arguments": {}}'
    assert split_tool_calls(text, weather_only) == (text, [])


def test_stream_passes_plain_text_through_at_once() -> None:
    stream = ToolStream(plan())
    assert stream.feed("Hel") == ("Hel", [])
    assert stream.feed("lo") == ("lo", [])
    assert stream.finish() == ("", [], False)


def test_stream_holds_a_possible_call_until_the_end() -> None:
    stream = ToolStream(plan())
    assert stream.feed(' {"name": "get_time", ') == ("", [])
    assert stream.feed('"arguments": {}}') == ("", [])
    content, deltas, made = stream.finish()
    assert made and content == ""
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "get_time", "{}")]


def test_stream_releases_held_text_that_was_not_a_call() -> None:
    stream = ToolStream(plan())
    assert stream.feed("{not json") == ("", [])
    assert stream.finish() == ("{not json", [], False)
    fenced = ToolStream(plan())
    assert fenced.feed("```py") == ("```py", [])


def test_forced_stream_equals_the_whole_output() -> None:
    text = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}'
    stream = ToolStream(plan(ToolChoice.REQUIRED))
    deltas = [d for i in range(0, len(text), 3) for d in stream.feed(text[i : i + 3])[1]]
    assert stream.finish()[2] is True
    _, calls = split_tool_calls(text, plan(ToolChoice.REQUIRED))
    assert "".join(d.arguments for d in deltas) == calls[0].arguments
    assert deltas[0].name == calls[0].name


def test_truncated_forced_call_is_content() -> None:
    text = '{"name": "get_weather", "arguments": {"ci'
    assert split_tool_calls(text, plan(ToolChoice.REQUIRED)) == (text, [])


CONVERSATION = [
    Turn("system", "Be brief."),
    Turn("user", "Weather in Oslo?"),
    Turn(
        "assistant",
        "",
        tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo", "unit": "c"}'),),
    ),
    Turn("tool", "-3 C, snow", tool_call_id="call_1"),
    Turn("tool", "second result", tool_call_id="call_1"),
]


def test_chatml_renders_tool_turns_as_text() -> None:
    template = load_template(CHATML_TEMPLATE, "builtin:chatml")
    assert not template.supports_tools
    messages = template_messages(CONVERSATION, plan(), native=False)
    text = template.render(messages)
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}' in text
    assert "Tool result (get_weather, call call_1):\n-3 C, snow\n\nTool result" in text
    assert text.count("<|im_start|>user") == 2  # both results in one user turn
    assert "Be brief.\n\n# Tools" in text  # the tool prompt joins the system message
    assert '"name": "get_time"' in text


def test_tool_prompt_is_a_new_system_message_when_there_is_none() -> None:
    messages = template_messages([Turn("user", "hi")], plan(ToolChoice.REQUIRED), native=False)
    assert messages[0]["role"] == "system"
    assert "You must call a tool now." in messages[0]["content"]
    assert template_messages([Turn("user", "hi")], None, native=False) == [
        {"role": "user", "content": "hi"}
    ]


TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
    "{% for m in messages %}{{ m.role }}:"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
    "{% elif m.role == 'tool' %}RESULT {{ m.name }} {{ m.tool_call_id }} {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}|{% endfor %}"
)


def test_template_that_renders_tools_gets_them_natively() -> None:
    template = load_template(TOOLS_TEMPLATE, "file:tools.jinja")
    assert template.supports_tools
    messages = template_messages(CONVERSATION, plan(), native=True)
    text = template.render(messages, tools=template_tools(plan()))
    assert text.startswith("TOOLS:get_weather;get_time;|")
    assert "|assistant:CALL get_weather Oslo|" in text  # arguments reach it as a mapping
    assert "|tool:RESULT get_weather call_1 -3 C, snow|" in text
    assert "# Tools" not in text
    assert template_tools(plan(ToolChoice.NONE)) is None
