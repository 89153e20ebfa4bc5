"""One shape for every pluggable policy: a :class:`Registry` maps names to factories and
resolves a spec (a name, or an object that already is one) through one method.

The registries: victim orders and preemption modes (:mod:`scheduler.policies`),
remaining-length predictors (:mod:`scheduler.predictor`), memory policies
(:mod:`scheduler.memory`) and cost models (:mod:`scheduler.costs`). Their names are
declared there once; the loop, the planner, the replay and its CLI read ``.names``.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> factories for one kind of pluggable policy.

    ``kind``: what it holds, for error messages (e.g. ``"predictor"``); ``factories``:
    name -> callable returning a fresh instance (keyword arguments are passed through);
    ``accepts``: whether an object given instead of a name already is one;
    ``adapt``: turns an accepted object into one (default: used as it is).
    """

    def __init__(self, kind: str, factories: dict[str, Callable[..., T]], *,
                 accepts: Callable[[Any], bool],
                 adapt: Callable[[Any], T] | None = None) -> None:
        self.kind = kind
        self._factories = dict(factories)
        self._accepts = accepts
        self._adapt = adapt

    @property
    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def register(self, name: str, factory: Callable[..., T]) -> None:
        """Add ``name`` (ValueError if taken or not a non-empty string)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = factory

    def resolve(self, spec: Any, **kwargs: Any) -> T:
        """A fresh instance for a registered name (``kwargs`` go to its factory), or
        ``spec`` itself when it already is one. ValueError for an unknown name, TypeError
        for anything else, both naming the kind."""
        if isinstance(spec, str):
            factory = self._factories.get(spec)
            if factory is None:
                raise ValueError(f"{self.kind} must be one of {list(self._factories)}, "
                                 f"got {spec!r}")
            return factory(**kwargs)
        if self._accepts(spec):
            return self._adapt(spec) if self._adapt is not None else spec
        raise TypeError(f"{self.kind} must be a name ({', '.join(self._factories)}) or "
                        f"an object of that kind, got {type(spec).__name__}")

    def check(self, spec: Any) -> None:
        """Raise what :meth:`resolve` would for a bad spec, building nothing."""
        if isinstance(spec, str):
            if spec not in self._factories:
                self.resolve(spec)
        elif not self._accepts(spec):
            self.resolve(spec)
