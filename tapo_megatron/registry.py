"""Named plug-ins: the one registry used where users plug in (rewards, advantage estimators, policy losses,
constructors). Duplicates are rejected, an unknown name lists the registered ones, and a ``"pkg.module:attr"``
name imports a user's plug-in on lookup. Each registry can check what it accepts (signature, base class).

    REWARDS = Registry("reward", check=check_reward_signature)
    @REWARDS.register("exact")
    def exact_answer_reward(response: str, gold: str) -> float: ...
    fn = REWARDS.get("exact")            # or REWARDS.get("my_pkg.rewards:my_reward")
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from tapo_megatron.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, check: Callable[[T, str], None] | None = None):
        self.kind = kind
        self._check = check
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an entry under ``name``; ValueError on a duplicate or malformed name."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"{self.kind} name must be a non-empty str without ':' (':' marks import paths), "
                             f"got {name!r}")

        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r}); "
                                 "pick another name")
            if self._check is not None:
                self._check(entry, name)
            self._entries[name] = entry
            return entry

        return decorator

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or imported from ``"pkg.module:attr"``.

        Raises UnknownNameError, a KeyError (listing the registered names) for an unknown name, ImportError / AttributeError for a bad
        import path, and whatever the registry's check raises for an entry of the wrong kind.
        """
        if ":" in name:
            return self._import(name)
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())} "
                           "(or give an import path 'pkg.module:attr')") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _import(self, path: str) -> T:
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise ValueError(f"{self.kind} import path must look like 'pkg.module:attr', got {path!r}")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"{self.kind} import path {path!r}: cannot import module {module_name!r}: {exc}") \
                from exc
        for part in attr.split("."):  # allows "module:Class.method"
            if not hasattr(obj, part):
                raise AttributeError(f"{self.kind} import path {path!r}: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if self._check is not None:
            self._check(obj, path)
        return obj
