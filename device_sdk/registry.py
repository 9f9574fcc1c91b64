"""One small name -> object registry, used for every pluggable part of the project.

Samplers, trainers and models on the cloud, runtimes and privacy accountants on the device (and
whatever else is chosen by name in a config file or on a command line) are kept in a
:class:`Registry`. It is standard library only, so the device can use it::

    SAMPLERS: Registry[Type[Sampler]] = Registry("sampler")

    @SAMPLERS.register            # the name is the object's ``name`` attribute
    class RandomSampler(Sampler):
        name = "random"

    @ACCOUNTANTS.register("rdp")  # or given explicitly
    def _rdp(mu2, delta): ...

    RUNTIMES.register("onnxruntime", OnnxSpec)  # or registered by a plain call

    SAMPLERS.get("random")        # UsageError naming the known names if it is not there

Registering a name twice is a programming error and raises ``ValueError`` at import time; asking
for an unknown name is a user error (a typo in a config file) and raises
:class:`~device_sdk.errors.UsageError` (exit code 2) whose message lists the names to choose from.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union, overload

from device_sdk.errors import UsageError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Objects of one kind by unique name.

    ``kind`` is the word error messages use ("sampler", "privacy accountant"). ``names()`` is
    sorted unless ``ordered`` is set, in which case registration order is kept (for registries
    where the order is a preference, like the runtimes ``auto`` tries). ``also`` are names the
    caller accepts besides the registered ones (e.g. ``"auto"``); they are only listed, first, in
    the message of an unknown name, and :meth:`get` does not resolve them.
    """

    def __init__(self, kind: str, *, ordered: bool = False, also: Sequence[str] = ()):
        if not kind:
            raise ValueError("a registry needs a kind (the word its messages use)")
        self.kind = kind
        self._ordered = ordered
        self._also: Tuple[str, ...] = tuple(also)
        self._items: Dict[str, T] = {}

    @overload
    def register(self, name_or_obj: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name_or_obj: str, obj: T) -> T: ...

    @overload
    def register(self, name_or_obj: T) -> T: ...

    def register(self, name_or_obj: Union[str, T], obj: Optional[T] = None) -> Any:
        """Add an object; usable as ``@reg.register``, ``@reg.register("name")`` or ``reg.register("name", obj)``.

        Without an explicit name the object's ``name`` attribute is used. Returns the object (or,
        given only a name, a decorator that returns it) so that decorated classes stay usable.
        """
        if isinstance(name_or_obj, str):
            name = name_or_obj
            if obj is None:
                return lambda target: self._add(name, target)
            return self._add(name, obj)
        if obj is not None:
            raise TypeError(f"{self.kind} registry: register(name, obj) takes the name first")
        return self._add(getattr(name_or_obj, "name", None), name_or_obj)

    def _add(self, name: Any, obj: T) -> T:
        if not isinstance(name, str) or not name:
            what = getattr(obj, "__name__", type(obj).__name__)
            raise ValueError(f"{self.kind} {what} needs a non-empty string name; got {name!r}")
        if name in self._items or name in self._also:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; :class:`UsageError` listing the choices if there is none."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a config file
            raise UsageError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.choices())}") from None

    def names(self) -> List[str]:
        """The registered names: sorted, or in registration order for an ``ordered`` registry."""
        return list(self._items) if self._ordered else sorted(self._items)

    def choices(self) -> List[str]:
        """What a user may pass: the ``also`` names, then :meth:`names`."""
        return list(self._also) + self.names()

    def items(self) -> List[Tuple[str, T]]:
        """``(name, object)`` pairs in the order of :meth:`names`."""
        return [(name, self._items[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()!r})"
