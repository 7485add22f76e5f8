"""Chat templates: Jinja from GGUF metadata or a file, rendered in a bounded sandbox.

A GGUF's chat template is untrusted input (CVE-2024-34359 ran code through one), so it is
rendered by Jinja's ImmutableSandboxedEnvironment, which blocks attribute access to internals
and mutation of the objects passed in. The sandbox does not bound work, so this one adds that:
every loop iteration, call, filter, operator and `~` passes a hook that charges a per-render
budget (wall time, characters produced) and refuses, before it runs, any single operation whose
result would be larger than a render may produce (`'x' * 10**9`, `s|indent(10**9)`,
`sep.join(...)`). Stopping happens inside the rendering thread, so the work really ends.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from llmserve.core.errors import InvalidRequestError

# Used when a model ships no template: ChatML is what most small instruct models expect.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Jinja templates shipped as package data, chosen by name (`--chat-template llama3`).
BUILTIN_TEMPLATES_DIR = Path(__file__).parent / "chat_templates"

# Real chat templates are a few KB; a megabyte is far beyond any of them.
MAX_TEMPLATE_CHARS = 1 << 20

# What render() itself passes: a request's chat_template_kwargs may not replace them.
RENDER_ARGUMENTS = frozenset(
    {"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"}
)

# The per-render budget travels in the render context under a name no template can spell.
_BUDGET = "llmserve render budget"
_ITERATE = "llmserve_iterate"
_FORMAT_NUMBER = re.compile(r"\d+")
# A container item costs about as much memory as this many characters of text.
ITEM_COST = 16
_SURROGATE = re.compile("[\ud800-\udfff]")
# Jinja's filters that call str() on their value: a list of large strings must be checked first.
_STRINGIFYING = frozenset(
    {
        "capitalize",
        "center",
        "e",
        "escape",
        "forceescape",
        "format",
        "indent",
        "join",
        "lower",
        "pprint",
        "replace",
        "reverse",
        "string",
        "striptags",
        "title",
        "tojson",
        "trim",
        "truncate",
        "upper",
        "urlencode",
        "urlize",
        "wordcount",
        "wordwrap",
        "xmlattr",
    }
)


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render: wall time, the largest value or prompt, all text produced.

    Sizes are in characters; a list, tuple or dict item counts as ITEM_COST characters.
    """

    seconds: float = 5.0
    max_chars: int = 8 << 20
    max_work_chars: int = 64 << 20
    max_int_bits: int = 1 << 16


DEFAULT_LIMITS = RenderLimits()


class TemplateError(InvalidRequestError):
    """The template failed to compile or to render these messages."""

    code = "chat_template_error"


class TemplateLimitError(TemplateError):
    """Rendering went over a RenderLimits bound (time, size)."""

    def __init__(self, message: str, *, param: str | None = "messages", code: str | None = None):
        super().__init__(message, param=param, code=code)


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}", param="messages")


def _strftime_now(fmt: str) -> str:
    if len(fmt) > 256:  # a format string expands (%c is 24 characters): keep it short
        raise TemplateLimitError("chat template: strftime_now format is too long")
    return datetime.datetime.now().strftime(fmt)


# ---- the budget -------------------------------------------------------------------------------


class _Budget:
    """Time and characters one render may still spend."""

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.chars = 0

    def spend(self, chars: int) -> None:
        """Charge `chars` produced characters (or one step); raise once over a limit."""
        self.chars += chars
        if self.chars > self.limits.max_work_chars:
            raise TemplateLimitError(
                f"chat template produces more than {self.limits.max_work_chars} characters"
            )
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"chat template takes longer than {self.limits.seconds:g} s to render"
            )

    def produced(self, value: Any) -> Any:
        """Charge a value an operation returned; refuse it when it is too large.

        Shallow on purpose (O(1)): a container costs its length, its items were charged when
        they were made. Turning a container into text is checked deeply where it happens.
        """
        size = _shallow_size(value)
        _allow(self.limits, size, "a value")
        self.spend(size + 1)
        return value


def _budget(context: Context) -> _Budget:
    budget = context.get(_BUDGET)
    if isinstance(budget, _Budget):
        return budget
    # Only a render outside ChatTemplate.render lacks one: bound each step on its own.
    return _Budget(getattr(context.environment, "limits", DEFAULT_LIMITS))


def _allow(limits: RenderLimits, size: int, what: str) -> None:
    if size > limits.max_chars:
        raise TemplateLimitError(
            f"chat template: {what} would be over {limits.max_chars} characters"
        )


def _shallow_size(value: Any) -> int:
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list | tuple | dict | set | frozenset):
        return ITEM_COST * len(value)
    if isinstance(value, int):
        return value.bit_length() // 3
    return 1


def _text_size(value: Any, cap: int, indent: int = 0) -> int:
    """About how many characters `str(value)` (or JSON with `indent`) has; stops past `cap`."""
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and total <= cap:
        item, depth = stack.pop()
        total += indent * depth
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        elif isinstance(item, Namespace):
            stack.append((object.__getattribute__(item, "_Namespace__attrs"), depth))
        else:
            total += 64
    return total


def _check_ints(limits: RenderLimits, args: Iterable[Any]) -> None:
    """Widths, counts and sizes given to str methods and filters stay below the output limit."""
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > limits.max_chars:
            raise TemplateLimitError(f"chat template: argument {arg} is too large")


def _check_format(limits: RenderLimits, fmt: str, args: Any) -> None:
    """`fmt % args`, `fmt.format(...)`: every number in the format may be a width."""
    runs = _FORMAT_NUMBER.findall(fmt)
    if any(len(run) > 12 for run in runs):  # int() of thousands of digits is slow itself
        raise TemplateLimitError("chat template: a format width is too large")
    _check_ints(limits, args if isinstance(args, tuple) else (args,))
    size = len(fmt) + sum(map(int, runs)) + _text_size(args, limits.max_chars)
    _allow(limits, size, "a formatted string")


# ---- estimates for operations whose output can be much larger than their input -----------------


def _replace_size(text: str, old: str, new: str, count: int | None) -> int:
    hits = len(text) + 1 if not old else text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


def _join_size(limits: RenderLimits, sep: str, items: Sequence[Any]) -> int:
    return len(sep) * len(items) + _text_size(list(items), limits.max_chars)


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def _str_method_size(
    limits: RenderLimits, text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, tuple[Any, ...]]:
    """The largest result a str method can give, and its arguments (join's made a list)."""
    if name == "join" and args:
        items = list(args[0])
        return _join_size(limits, text, items), (items, *args[1:])
    if name == "replace" and len(args) >= 2:
        return _replace_size(text, str(args[0]), str(args[1]), _arg(args, kwargs, 2, "count")), args
    if name == "expandtabs":
        tabsize = _arg(args, kwargs, 0, "tabsize")
        return len(text) + text.count("\t") * (8 if tabsize is None else int(tabsize)), args
    if name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((_text_size(v, limits.max_chars) for v in args[0].values()), default=1)
        return len(text) * max(longest, 1), args
    return len(text), args


def _filter_size(
    limits: RenderLimits, name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int, Any]:
    """The largest result the filter `name` can give, and its value (join's made a list)."""
    cap = limits.max_chars
    # Only filters that turn their value into text need its full text size (a deep walk).
    size = _text_size(value, cap) if name in _STRINGIFYING else _shallow_size(value)
    if name == "join":
        items = list(value)
        sep = _arg(args, kwargs, 0, "d")
        return _join_size(limits, "" if sep is None else str(sep), items), items
    if name == "replace" and len(args) >= 2 and size <= cap:
        count = _arg(args, kwargs, 2, "count")
        return _replace_size(str(value), str(args[0]), str(args[1]), count), value
    if name == "indent" and size <= cap:
        width = _arg(args, kwargs, 0, "width")
        step = 4 if width is None else width if isinstance(width, int) else len(str(width))
        return size + (str(value).count("\n") + 1) * step, value
    if name == "wordwrap":
        wrap = _arg(args, kwargs, 2, "wrapstring")
        return size * (1 + (1 if wrap is None else len(str(wrap)))), value
    if name == "tojson":
        indent = _arg(args, kwargs, 0, "indent")
        step = indent if isinstance(indent, int) else 0
        return 6 * _text_size(value, cap, step), value  # non-ASCII becomes \\uXXXX
    if name == "format" and isinstance(value, str):
        _check_format(limits, value, args or kwargs)
    if name in ("escape", "e", "forceescape", "urlencode", "pprint"):
        return 12 * size, value
    if name == "urlize":
        extra = sum(len(str(kwargs.get(k) or "")) for k in ("target", "rel"))
        return size * (12 + extra), value
    if name == "sum" and not isinstance(_arg(args, kwargs, 1, "start") or 0, int | float):
        raise TemplateLimitError("chat template: sum() adds numbers only")
    return size, value


# ---- the sandbox -------------------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a checked join (the sandbox has no hook for it)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat(context, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus a budget charged by every loop step, call and operator."""

    code_generator_class = _BoundedCodeGenerator
    # Intercepted operators are also never folded at compile time, so `10 ** 10 ** 9` written
    # in a template cannot hang the switch either.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limits: RenderLimits):
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.ChainableUndefined,
            finalize=_finalize,
        )
        self.limits = limits
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters[_ITERATE] = _iterate

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            # Every loop step charges the budget, weighted by the literal text its body writes.
            weight = 1 + sum(len(d.data) for d in _descendants(loop.body, nodes.TemplateData))
            counted = nodes.Filter(
                loop.iter, _ITERATE, [nodes.Const(weight)], [], None, None, lineno=loop.lineno
            )
            loop.iter = counted.set_environment(self)
        return tree

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Call from the template: charged, size-checked before and after."""
        budget = _budget(__context)
        budget.spend(1)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | list | tuple | dict):
            _check_ints(__self.limits, (*args, *kwargs.values()))
        if isinstance(owner, str):
            size, args = _str_method_size(__self.limits, owner, __obj.__name__, args, kwargs)
            _allow(__self.limits, size, f"the result of {__obj.__name__}()")
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (_counted(budget, args[0], 1), *args[1:])
        return budget.produced(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """`*`, `**`, `+`, `%`, refused before they run when the result would be too large."""
        budget = _budget(context)
        budget.spend(1)
        _check_binop(self.limits, operator, left, right)
        return budget.produced(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format`: the sandbox's safe formatter, with its widths checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        limits = self.limits

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(limits, fmt, (*args, *kwargs.values()))
            return wrapped(*args, **kwargs)

        return checked

    def bounded_concat(self, context: Context, parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...`, checked like every other operation."""
        budget = _budget(context)
        _allow(self.limits, _text_size(parts, self.limits.max_chars), "a joined string")
        return str(budget.produced("".join(str(part) for part in parts)))


def _descendants(body: list[nodes.Node], kind: type[nodes.Node]) -> Iterator[Any]:
    for child in body:
        if isinstance(child, kind):
            yield child
        yield from child.find_all(kind)


def _check_binop(limits: RenderLimits, operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int):
                size = _shallow_size(seq) * max(times, 0)
                _allow(limits, size, "a repeated value")
        if isinstance(left, int) and isinstance(right, int):
            _check_bits(limits, left.bit_length() + right.bit_length())
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if abs(left) > 1 and right > 0:
            _check_bits(limits, right * left.bit_length())
    elif operator == "+" and isinstance(left, str | list | tuple):
        if isinstance(right, str | list | tuple):
            _allow(limits, _shallow_size(left) + _shallow_size(right), "a concatenation")
    elif operator == "%" and isinstance(left, str):
        _check_format(limits, left, right)


def _check_bits(limits: RenderLimits, bits: int) -> None:
    if bits > limits.max_int_bits:
        raise TemplateLimitError(f"chat template: a number would exceed {limits.max_int_bits} bits")


@jinja2.pass_context
def _finalize(context: Context, value: Any) -> Any:
    """Every `{{ value }}` written out is charged, by the size of its text."""
    budget = _budget(context)
    _allow(budget.limits, _text_size(value, budget.limits.max_chars), "a value written out")
    return budget.produced(value)


@jinja2.pass_context
def _iterate(context: Context, iterable: Any, weight: int) -> Iterator[Any]:
    """A loop's iterable, charging `weight` per step."""
    return _counted(_budget(context), iterable, weight)


def _counted(budget: _Budget, iterable: Iterable[Any], weight: int) -> Iterator[Any]:
    for item in iterable:
        budget.spend(weight)
        yield item


def _passed(kind: str | None, context: Context) -> tuple[Any, ...]:
    """What a filter marked pass_context / pass_eval_context / pass_environment gets first."""
    if kind == "context":
        return (context,)
    if kind == "eval_context":
        return (context.eval_ctx,)
    if kind == "environment":
        return (context.environment,)
    return ()


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with its arguments checked first and its result charged."""
    passed = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

    @jinja2.pass_context
    def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget(context)
        budget.spend(1)
        limits: RenderLimits = context.environment.limits  # type: ignore[attr-defined]
        _check_ints(limits, (*args, *kwargs.values()))
        size, value = _filter_size(limits, name, value, args, kwargs)
        _allow(limits, size, f"the result of |{name}")
        return budget.produced(func(*_passed(passed, context), value, *args, **kwargs))

    return bounded


# ---- templates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template plus the special-token strings it may reference."""

    source: str
    origin: str  # "gguf", "file:<name>", or "builtin:chatml"
    bos_token: str = ""
    eos_token: str = ""
    limits: RenderLimits = DEFAULT_LIMITS
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)
    supports_tools: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Compile once, at load/switch time, so a broken template fails there and not per request.
        object.__setattr__(self, "_compiled", _compile(self.source, self.limits))
        supports_tools = _reads_variable(self._compiled, self.source, "tools")
        object.__setattr__(self, "supports_tools", supports_tools)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Render `messages` into a prompt string, within this template's RenderLimits."""
        reserved = RENDER_ARGUMENTS | self._compiled.environment.globals.keys()
        for key in extra or {}:
            if key in reserved:
                raise InvalidRequestError(
                    f"chat_template_kwargs may not set `{key}`: the server passes it",
                    param=f"chat_template_kwargs.{key}",
                )
        variables = {
            **(extra or {}),
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": list(tools) if tools else None,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            _BUDGET: _Budget(self.limits),
        }
        try:
            return self._render(variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed to render: {exc}", param="messages") from exc
        except Exception as exc:  # the template's own bug (1/0, range(10**9), recursion...)
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise TemplateError(
                f"chat template failed to render: {reason}", param="messages"
            ) from exc

    def _render(self, variables: dict[str, Any]) -> str:
        budget: _Budget = variables[_BUDGET]
        chunks: list[str] = []
        size = 0
        for chunk in self._compiled.generate(variables):
            size += len(chunk)
            _allow(self.limits, size, "the prompt")
            budget.spend(len(chunk))
            chunks.append(chunk)
        text = "".join(chunks)
        if _SURROGATE.search(text):
            # Request bodies cannot hold one; JSON text inside a field (tool call arguments) can.
            raise TemplateError(
                "the rendered prompt holds a lone UTF-16 surrogate, which is not text",
                param="messages",
            )
        return text

    def check_renders(self) -> None:
        """Render a one-message chat; raise TemplateError when even that fails."""
        try:
            self.render([{"role": "user", "content": "Hello"}])
        except TemplateError as exc:
            raise type(exc)(
                f"chat template {self.origin} cannot render a simple chat: {exc.message}",
                param="name",  # what the admin switch names; nothing at start-up
            ) from exc


def _compile(source: str, limits: RenderLimits) -> jinja2.Template:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"chat template is longer than {MAX_TEMPLATE_CHARS} characters")
    env = _BoundedSandbox(limits)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from exc
    except (RecursionError, MemoryError, SyntaxError, ValueError) as exc:  # nesting too deep
        raise TemplateError(f"chat template does not compile: {type(exc).__name__}") from exc


def _reads_variable(template: jinja2.Template, source: str, name: str) -> bool:
    """Whether the template reads the context variable `name` (e.g. renders `tools`)."""
    # Parsed by the bounded sandbox: a plain one would fold `'%999999999d' % 1` while analysing.
    try:
        tree = template.environment.parse(source)
        return name in jinja2.meta.find_undeclared_variables(tree)
    except (jinja2.TemplateError, RecursionError, MemoryError):
        return False


def read_template_file(path: Path) -> str:
    """A template file's text; TemplateError when it is too large or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TemplateError(
            f"template {path.name} cannot be read: {exc.strerror}", param="name"
        ) from None
    if len(raw) > 4 * MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template {path.name} is larger than a chat template", param="name")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateError(
            f"template {path.name} is not UTF-8 text (byte {exc.start})", param="name"
        ) from None


def builtin_template_names() -> list[str]:
    """Names of the chat templates shipped with llmserve (`--chat-template chatml`, ...)."""
    return sorted(path.stem for path in BUILTIN_TEMPLATES_DIR.glob("*.jinja"))


def builtin_template(name: str) -> str | None:
    """The source of a shipped chat template, or None when there is none of that name."""
    if name not in builtin_template_names():  # never a path: only the shipped names
        return None
    return (BUILTIN_TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def load_template(
    source: str | None, origin: str, bos_token: str = "", eos_token: str = ""
) -> ChatTemplate:
    """Build a ChatTemplate, falling back to ChatML when the model has none; checks it compiles.

    A template from a file (origin `file:...`, an operator's choice) must also render a simple
    chat, so a broken one is refused at switch time and the old one stays.
    """
    if not source:
        return ChatTemplate(CHATML_TEMPLATE, "builtin:chatml", bos_token, eos_token)
    template = ChatTemplate(source, origin, bos_token, eos_token)
    if origin.startswith("file:"):
        template.check_renders()
    return template
