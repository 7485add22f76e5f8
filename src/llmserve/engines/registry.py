"""Which engines a server can run: factories by name, chosen by the `engine` setting.

A registry is an object the app owns (tests build their own and register fake engines);
`default_registry` holds the engines shipped with llmserve. Factories import their engine
library only when they check or load a model, so the registry costs nothing to build.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmserve.engines.base import EngineFactory, InvalidEngineSettingError


class EngineRegistry:
    """Engine factories by name."""

    def __init__(self, factories: Iterable[EngineFactory] = ()) -> None:
        self._factories: dict[str, EngineFactory] = {}
        for factory in factories:
            self.register(factory)

    def register(self, factory: EngineFactory) -> None:
        """Make `factory.name` a valid `engine` setting (a later one of that name replaces it)."""
        self._factories[factory.name] = factory

    def get(self, name: str) -> EngineFactory:
        """The factory called `name`; 400 naming `engine` when there is none."""
        factory = self._factories.get(name)
        if factory is None:
            known = ", ".join(sorted(self._factories)) or "none"
            raise InvalidEngineSettingError(
                f"there is no engine called {name!r} (engines: {known})", param="engine"
            )
        return factory

    def setting_names(self) -> set[str]:
        """Every setting some registered engine has."""
        return {name for f in self._factories.values() for name in f.settings_type.model_fields}

    @property
    def names(self) -> list[str]:
        """The registered engines' names."""
        return sorted(self._factories)


def default_registry() -> EngineRegistry:
    """The engines that ship with llmserve."""
    from llmserve.engines.llamacpp.factory import LlamaCppFactory
    from llmserve.engines.vllm.factory import VllmFactory

    return EngineRegistry([LlamaCppFactory(), VllmFactory()])
