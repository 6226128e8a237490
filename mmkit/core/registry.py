"""Registries of swappable components, and discovery of third-party plugins.

Every kind of component (encoder, connector, decoder, template, dataset, evaluator, teacher)
has one registry. A component registers under an exact name with a decorator; a config node
selects it by that name (``name: ...``) and holds its keyword arguments.
"""
from __future__ import annotations

import difflib
import inspect
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Mapping, TypeVar

from mmkit.core.errors import ConfigError

PLUGIN_GROUP = "mmkit.plugins"

T = TypeVar("T")


@dataclass(frozen=True)
class _Family:
    """Names matching one pattern (e.g. ``mlp{N}x_gelu``) served by one factory."""

    pattern: re.Pattern[str]
    display: str
    factory: Callable[..., Any]


class Registry(Generic[T]):
    """Named constructors of one kind of component, all subclasses of ``base``."""

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self._base = base
        self._entries: dict[str, Callable[..., T]] = {}
        self._families: list[_Family] = []

    def set_base(self, base: type) -> None:
        """Bind the base class once it is importable (bases live beside their components)."""
        self._base = base

    def _check(self, name: str, component: Any) -> None:
        if name in self._entries or any(f.display == name for f in self._families):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        base = self._base
        if base is not None and isinstance(component, type) and not issubclass(component, base):
            raise TypeError(
                f"{self.kind} {name!r}: {component.__qualname__} is not a subclass of {base.__qualname__}"
            )

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@ENCODERS.register("hf_clip")`` on a class or factory function."""

        def decorator(component: Callable[..., T]) -> Callable[..., T]:
            self._check(name, component)
            self._entries[name] = component
            return component

        return decorator

    def register_family(self, pattern: str, display: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register a factory for every name that *fully* matches ``pattern``.

        The factory receives the pattern's named groups as keyword arguments, e.g.
        ``mlp(?P<depth>\\d+)x_gelu`` turns ``mlp3x_gelu`` into ``factory(depth="3", ...)``.
        """

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self._check(display, factory)
            self._families.append(_Family(re.compile(pattern), display, factory))
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries) + [f.display for f in self._families]

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except ConfigError:
            return False
        return True

    def get(self, name: str, key: str = "name") -> Callable[..., T]:
        """The constructor registered as ``name``; ``key`` is the config key that named it."""
        if name in self._entries:
            return self._entries[name]
        for family in self._families:
            match = family.pattern.fullmatch(str(name))
            if match:
                return _bind_family(family.factory, match.groupdict())
        raise ConfigError(self.unknown_message(name, key))

    def unknown_message(self, name: Any, key: str) -> str:
        choices = self.names()
        close = difflib.get_close_matches(str(name), choices + sorted(self._family_examples()), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}={name!r}: unknown {self.kind}; registered: {', '.join(choices) or '(none)'}{hint}"

    def _family_examples(self) -> list[str]:
        # A concrete instance of each family gives difflib something to match a typo against.
        return [re.sub(r"\{(\w+)\}", "2", f.display) for f in self._families]

    def build(self, node: Mapping[str, Any], key: str, **extra: Any) -> T:
        """Build the component that ``node.name`` selects, passing the rest of ``node`` as kwargs."""
        if "name" not in node:
            raise ConfigError(f"{key}: missing 'name' (one of: {', '.join(self.names())})")
        kwargs = {k: v for k, v in node.items() if k != "name"}
        kwargs.update(extra)
        constructor = self.get(node["name"], key=f"{key}.name")
        check_arguments(constructor, kwargs, key, node["name"])
        return constructor(**kwargs)


def check_arguments(constructor: Callable[..., Any], kwargs: dict[str, Any], key: str, name: str) -> None:
    """A config key the component does not take is a typo: name it instead of a TypeError deep inside."""
    try:
        signature = inspect.signature(constructor)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    accepted = [p for p in signature.parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{key}: {name!r} takes no option(s) {', '.join(unknown)}; it takes: {', '.join(accepted)}")


def _bind_family(factory: Callable[..., Any], groups: dict[str, str]) -> Callable[..., Any]:
    def construct(**kwargs: Any) -> Any:
        return factory(**groups, **kwargs)

    # The signature users configure is the factory's, minus what the name itself supplies.
    parameters = [p for name, p in inspect.signature(factory).parameters.items() if name not in groups]
    construct.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return construct


ENCODERS: Registry = Registry("encoder")
CONNECTORS: Registry = Registry("connector")
DECODERS: Registry = Registry("decoder")
TEMPLATES: Registry = Registry("template")
DATASETS: Registry = Registry("dataset")
EVALUATORS: Registry = Registry("evaluator")
TEACHERS: Registry = Registry("teacher")
SOURCES: Registry = Registry("source")  # annotation sources: images with captions and boxes, for teachers
JUDGES: Registry = Registry("judge")


# mmkit's own components register through this group too, under this entry point's name, so
# the registry never imports a component.
BUILT_IN = "mmkit"


def plugin_entry_points() -> list[Any]:
    """Third-party plugins' entry points (mmkit's own is not a plugin)."""
    return sorted((ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name != BUILT_IN), key=lambda ep: ep.name)


_loaded = False


def load_components() -> None:
    """Import mmkit's own components, then every installed plugin (once per process).

    A plugin that fails to import (registering happens as it imports) is reported by name and
    skipped, so one broken package does not take down runs that do not use it; mmkit's own must
    load.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    built_in = [ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name == BUILT_IN]
    if not built_in:
        raise ConfigError(
            f"mmkit's '{PLUGIN_GROUP}' entry point is missing: mmkit is not installed in this Python "
            "(pip install -e . or the wheel), so none of its components are registered"
        )
    built_in[0].load()

    for ep in plugin_entry_points():
        try:
            ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001  even sys.exit() in third-party code must not end mmkit
            warnings.warn(
                f"mmkit plugin {ep.name!r} ({ep.value}) failed to load and was skipped: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
