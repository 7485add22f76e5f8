"""Chat templates in the bounded sandbox: hostile ones end in TemplateError, never a hang or 500."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.core.errors import InvalidRequestError
from llmserve.core.templates import (
    CHATML_TEMPLATE,
    MAX_TEMPLATE_CHARS,
    RENDER_ARGUMENTS,
    ChatTemplate,
    RenderLimits,
    TemplateError,
    TemplateLimitError,
    load_template,
    read_template_file,
)

HELLO = [{"role": "user", "content": "Hello"}]
# Short enough that the time-bound tests end quickly on a loaded machine.
QUICK = RenderLimits(seconds=0.5)


def render(source: str, limits: RenderLimits = QUICK, **kwargs: object) -> str:
    return ChatTemplate(source, "test", limits=limits).render(HELLO, **kwargs)  # type: ignore[arg-type]


# Templates that would hang a request or eat memory in a plain sandbox.
RUNAWAY = {
    "nested loops, 10^10 steps": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}",
    "repeat a string": "{{ 'x' * 10**10 }}",
    "repeat a list": "{{ ['x'] * 10**10 }}",
    "huge power": "{{ 7 ** (10 ** 7) }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "center": "{{ 'x'|center(10**9) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "indent": "{{ ('\\n' * 1000000)|indent(1000000) }}",
    "join filter": "{{ range(100000)|join('x' * 1000000) }}",
    "join method": "{{ ('x' * 1000000).join(range(100000)|map('string')) }}",
    "replace filter": "{% set s = 'a' * 1000000 %}{{ s|replace('a', s) }}",
    "replace method": "{% set s = 'a' * 1000000 %}{{ s.replace('', s) }}",
    "percent width": "{{ '%999999999d' % 1 }}",
    "format width": "{{ '{:999999999}'.format(1) }}",
    "format filter width": "{{ '%0999999999d'|format(1) }}",
    "tojson indent": "{{ ([1] * 100000)|tojson(indent=1000) }}",
    "output in a loop": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "literal text in a loop": "{% for i in range(100000) %}{% for j in range(100000) %}"
    + "z" * 1000
    + "{% endfor %}{% endfor %}",
    "macro output": "{% macro m() %}{% for j in range(100000) %}" + "z" * 1000 + "{% endfor %}"
    "{% endmacro %}{% for i in range(1000) %}{% set x = m() %}{% endfor %}",
    "stringify a list of big strings": "{{ ['x' * 1000000] * 1000 }}",
}


@pytest.mark.parametrize("source", RUNAWAY.values(), ids=RUNAWAY.keys())
def test_runaway_templates_are_stopped(source: str) -> None:
    with pytest.raises(TemplateLimitError) as caught:
        render(source)
    assert caught.value.status == 400
    assert caught.value.code == "chat_template_error"


# Templates with ordinary bugs: a non-Jinja exception becomes a 400, not a 500.
BROKEN = {
    "ZeroDivisionError": "{{ 1 / 0 }}",
    "TypeError": "{{ 1 + 'a' }}",
    "OverflowError (range)": "{{ range(10**9)|length }}",
    "OverflowError (float)": "{{ 10.0 ** 400 }}",
    "RecursionError (macro)": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "RecursionError (loop)": "{% for x in [1] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "ValueError": "{{ 'a b'.split('') }}",
    "raise_exception": "{{ raise_exception('no system role') }}",
    "undefined call": "{{ nothing() }}",
}


@pytest.mark.parametrize("source", BROKEN.values(), ids=BROKEN.keys())
def test_template_bugs_are_template_errors(source: str) -> None:
    with pytest.raises(TemplateError) as caught:
        render(source)
    assert caught.value.status == 400
    assert caught.value.param == "messages"


def test_a_memory_error_while_rendering_is_a_template_error() -> None:
    template = ChatTemplate("{{ messages[0].content }}", "test")
    exploding = [{"role": "user", "content": _Explodes()}]
    with pytest.raises(TemplateError):
        template.render(exploding)


class _Explodes:
    def __str__(self) -> str:
        raise MemoryError


def test_ordinary_templates_still_render() -> None:
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ m.role ~ ':' ~ m.content.strip() }}{% endfor %}|{{ ns.n }}|{{ '%s-%d'|format('a', 3) }}"
        "|{{ '{} {}'.format(1, 'b') }}|{{ tools|tojson }}|{{ [1, 2]|join(', ') }}"
        "|{{ 'a-b'.replace('-', '+') }}|{{ 'x' * 3 }}|{{ 2 ** 10 }}|{{ 'ab'|center(6) }}"
    )
    out = render(source, tools=[{"name": "f"}])
    assert out == 'user:Hello|1|a-3|1 b|[{"name": "f"}]|1, 2|a+b|xxx|1024|  ab  '


def test_a_long_chat_renders_within_the_limits() -> None:
    messages = [{"role": "user", "content": "word " * 200} for _ in range(2000)]
    text = load_template(None, "gguf").render(messages)
    assert text.count("<|im_start|>") == 2001


def test_limits_are_per_render() -> None:
    template = ChatTemplate(
        "{% for i in range(50000) %}{{ 'x' * 100 }}{% endfor %}",
        "test",
        limits=RenderLimits(max_work_chars=20_000_000),
    )
    for _ in range(3):  # each render spends ~15M of its own 20M budget
        assert len(template.render(HELLO)) == 5_000_000


@pytest.mark.parametrize("key", sorted(RENDER_ARGUMENTS | {"raise_exception", "range"}))
def test_reserved_kwargs_are_refused(key: str) -> None:
    template = load_template(CHATML_TEMPLATE, "gguf")
    with pytest.raises(InvalidRequestError) as caught:
        template.render(HELLO, extra={key: "x"})
    assert caught.value.param == f"chat_template_kwargs.{key}"


def test_free_kwargs_reach_the_template() -> None:
    template = ChatTemplate("{{ enable_thinking }}", "test")
    assert template.render(HELLO, extra={"enable_thinking": False}) == "False"


def test_a_template_that_does_not_compile() -> None:
    with pytest.raises(TemplateError):
        ChatTemplate("{% for %}", "test")
    with pytest.raises(TemplateError):
        ChatTemplate("{{ " + "(" * 100_000 + " }}", "test")
    with pytest.raises(TemplateError):
        ChatTemplate("x" * (MAX_TEMPLATE_CHARS + 1), "test")


def test_a_file_template_must_render_a_simple_chat() -> None:
    spins = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError) as caught:
        load_template("{{ range(10**9)|list }}", "file:big.jinja")
    assert "file:big.jinja" in caught.value.message
    with pytest.raises(TemplateLimitError):
        ChatTemplate(spins, "file:spin.jinja", limits=QUICK).check_renders()
    # The model's own template is not probed: completions still work with a broken one.
    assert load_template("{{ 1 / 0 }}", "gguf").origin == "gguf"


def test_template_files_must_be_utf8(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.jinja"
    latin1.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(TemplateError) as caught:
        read_template_file(latin1)
    assert caught.value.param == "name" and "UTF-8" in caught.value.message
    good = tmp_path / "good.jinja"
    good.write_bytes("\ufeff{{ 'caf\u00e9' }}".encode())
    assert read_template_file(good) == "{{ 'caf\u00e9' }}"


def test_a_prompt_with_a_lone_surrogate_is_refused() -> None:
    # Bodies cannot carry one (the parser refuses it), but JSON text inside a field can.
    template = load_template(None, "gguf")
    with pytest.raises(TemplateError) as caught:
        template.render([{"role": "user", "content": "a\ud800"}])
    assert caught.value.param == "messages"
    assert "\U0001f600" in template.render([{"role": "user", "content": "\U0001f600"}])
