"""What every dynamic provider of this project shares: input checks, diff, and (for libvirt
objects) idempotent delete and read."""

from __future__ import annotations

import functools
import json
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, is_typeddict

from pulumi.dynamic import CheckFailure, CheckResult, DiffResult, ReadResult, ResourceProvider
from pulumi.output import Output, Unknown
from pulumi.runtime.rpc import UNKNOWN

from aihow_infra.errors import LibvirtError
from aihow_infra.libvirt.connection import connect
from aihow_infra.libvirt.render import whole_numbers
from aihow_infra.libvirt_names import canonical_uri

T = TypeVar("T")
# An input that may be another resource's output; the engine resolves it before a provider
# sees it. (pulumi.Input names Output lazily, which type hints cannot resolve at run time.)
Input = Union[T, Output[T]]  # noqa: UP007


def is_unknown(value: Any) -> bool:
    """True for a value that is computed later (preview)."""
    return value == UNKNOWN or isinstance(value, Unknown)


@functools.cache
def _input_types(inputs: type) -> dict[str, tuple[bool, tuple[type, ...], tuple[Any, ...]]]:
    """For each key of an inputs TypedDict: (required, allowed runtime types, allowed literal values).

    ``Input[T]`` fields accept ``T``; a nested TypedDict is a dict; ``float`` also takes an int.
    """
    hints = typing.get_type_hints(inputs)
    required: frozenset[str] = getattr(inputs, "__required_keys__", frozenset())
    return {key: (key in required, *_runtime(hint)) for key, hint in hints.items()}


def _runtime(hint: Any) -> tuple[tuple[type, ...], tuple[Any, ...]]:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        kinds: tuple[type, ...] = ()
        values: tuple[Any, ...] = ()
        for arg in get_args(hint):
            more_kinds, more_values = _runtime(arg)
            kinds, values = kinds + more_kinds, values + more_values
        return kinds, values
    if origin is Literal:
        return tuple({type(v) for v in get_args(hint)}), get_args(hint)
    if origin is Output or hint is Output:
        return (), ()
    if is_typeddict(hint):
        return (dict,), ()
    if hint is float:
        return (int, float), ()
    return ((origin or hint),), ()


class Provider(ResourceProvider):
    """Base of the project's dynamic providers.

    Subclasses declare their inputs: ``INPUTS`` (a TypedDict: keys, types, which are
    required), ``REPLACE`` (keys whose change forces a new resource) and ``UPDATE``
    (keys changed in place). Providers hold no state: everything comes from the inputs.
    """

    INPUTS: ClassVar[type]
    REPLACE: ClassVar[frozenset[str]] = frozenset()
    UPDATE: ClassVar[frozenset[str]] = frozenset()
    # Keys holding lists whose order means nothing (compared as sets of items).
    UNORDERED: ClassVar[frozenset[str]] = frozenset()
    # Observed outputs that must hold (e.g. ``active: True``); a refresh that sees otherwise
    # makes the next diff an update, which puts them right.
    MUST_HOLD: ClassVar[dict[str, Any]] = {}
    # The provider captures no secrets; an always-secret blob only costs time (pulumi#15538).
    serialize_as_secret_always = False

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        """Missing or mistyped inputs become check failures, before anything is touched."""
        news = whole_numbers(news)
        failures = []
        for key, (required, kinds, literals) in _input_types(self.INPUTS).items():
            value = news.get(key)
            if is_unknown(value) or (value is None and (not required or type(None) in kinds)):
                continue
            if value is None:
                failures.append(CheckFailure(key, f"{key} is required"))
            elif literals and value not in literals:
                allowed = " or ".join(", ".join(repr(v) for v in literals).rsplit(", ", 1))
                failures.append(CheckFailure(key, f"{key}: {value!r}; allowed: {allowed}"))
            elif not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                failures.append(CheckFailure(key, f"{key}: {value!r} is not of type {_type_name(kinds)}"))
        failures += self.check_values(news)
        return CheckResult(news, failures)

    def _comparable(self, key: str, value: Any) -> Any:
        if key == "uri" and isinstance(value, str):
            return canonical_uri(value)
        if key in self.UNORDERED and isinstance(value, list):
            return sorted(json.dumps(v, sort_keys=True) for v in value)
        return value

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """Provider-specific checks of input values; none by default."""
        return []

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        """Compare the declared keys only (never ``__provider``); libvirt names are unique, so
        a replacement deletes the old object first."""
        changed = sorted(k for k in self.REPLACE | self.UPDATE if self._comparable(k, olds.get(k))
                         != self._comparable(k, news.get(k)))
        changed += [k for k, v in self.MUST_HOLD.items() if k in olds and olds[k] != v]
        replaces = [k for k in changed if k in self.REPLACE]
        return DiffResult(changes=bool(changed), replaces=replaces, stables=[],
                          delete_before_replace=bool(replaces))


def _type_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds if k is not type(None))


class LibvirtProvider(Provider):
    """A provider of one kind of libvirt object, found by name from its inputs.

    Subclasses say how to ``find`` the object (None when it does not exist), how to
    ``remove`` it, and what outputs it shows (``observe``); delete and read are the same
    for every kind: a missing object is a successful delete, and an empty id on read.
    """

    KIND: ClassVar[str] = "object"

    def refuse_existing(self, conn: Any, props: dict[str, Any], how_to_remove: str) -> Any:
        """Before creating: an object of that name is taken over only when ``is_ours`` (an
        interrupted run of this stack made it); any other is refused, never touched. Returns
        the object taken over, or None."""
        found = self.find(conn, props)
        if found is None:
            return None
        if self.left_by_us(found, props):
            return found
        raise LibvirtError(f"{self.KIND} {props['name']!r} already exists outside this stack; remove it "
                           f"({how_to_remove}) or rename the cluster")

    def is_ours(self, obj: Any, props: dict[str, Any]) -> bool:
        """True when an existing object of this name is this stack's own: made by this resource,
        or left by an interrupted run of it. Read and delete see only such objects."""
        return False

    def left_by_us(self, obj: Any, props: dict[str, Any]) -> bool:
        """True when an object found by a create is this stack's own, so it is taken over."""
        return self.is_ours(obj, props)

    def find(self, conn: Any, props: dict[str, Any]) -> Any:
        """The libvirt object, or None when it does not exist."""
        raise NotImplementedError

    def remove(self, obj: Any, props: dict[str, Any]) -> None:
        """Remove an existing object."""
        raise NotImplementedError

    def observe(self, obj: Any, props: dict[str, Any]) -> dict[str, Any]:
        """The outputs for an existing object: the inputs plus what libvirt reports."""
        raise NotImplementedError

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        """Remove the object; one already gone is success, and one of that name that is not
        ours (made anew by someone else) is left alone."""
        with connect(props["uri"]) as conn:
            obj = self.find(conn, props)
            if obj is not None and self.is_ours(obj, props):
                self.remove(obj, props)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """What libvirt holds now; an empty id when the object was removed behind Pulumi's back
        (or replaced by one that is not ours)."""
        with connect(props["uri"]) as conn:
            obj = self.find(conn, props)
            if obj is None or not self.is_ours(obj, props):
                return ReadResult(None, {})
            return ReadResult(id_, self.observe(obj, props))
