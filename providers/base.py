"""What every dynamic provider of this project shares: input checks, diff, and (for libvirt
objects) idempotent delete and read."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pulumi.dynamic import CheckFailure, CheckResult, DiffResult, ReadResult, ResourceProvider
from pulumi.output import Unknown

from aihow_infra.errors import LibvirtError
from providers.libvirt_conn import connect
from providers.render import whole_numbers

# What the engine sends in place of a value not known yet (during preview).
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


def is_unknown(value: Any) -> bool:
    """True for a value that is computed later (preview)."""
    return value == UNKNOWN or isinstance(value, Unknown)


class Provider(ResourceProvider):
    """Base of the project's dynamic providers.

    Subclasses declare their inputs: ``REQUIRED`` (name -> type), ``REPLACE``
    (keys whose change forces a new resource) and ``UPDATE`` (keys changed in
    place). Providers hold no state: everything comes from the inputs.
    """

    REQUIRED: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    REPLACE: ClassVar[frozenset[str]] = frozenset()
    UPDATE: ClassVar[frozenset[str]] = frozenset()
    # Keys holding lists whose order means nothing (compared as sets of items).
    UNORDERED: ClassVar[frozenset[str]] = frozenset()
    # The provider captures no secrets; an always-secret blob only costs time (pulumi#15538).
    serialize_as_secret_always = False

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        """Missing or mistyped inputs become check failures, before anything is touched."""
        news = whole_numbers(news)
        failures = []
        for key, kind in self.REQUIRED.items():
            value = news.get(key)
            if is_unknown(value):
                continue
            if value is None:
                failures.append(CheckFailure(key, f"{key} is required"))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                failures.append(CheckFailure(key, f"{key}: {value!r} is not of type {_type_name(kind)}"))
        failures += self.check_values(news)
        return CheckResult(news, failures)

    def _comparable(self, key: str, value: Any) -> Any:
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
        replaces = [k for k in changed if k in self.REPLACE]
        return DiffResult(changes=bool(changed), replaces=replaces, stables=[],
                          delete_before_replace=bool(replaces))


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


class LibvirtProvider(Provider):
    """A provider of one kind of libvirt object, found by name from its inputs.

    Subclasses say how to ``find`` the object (None when it does not exist), how to
    ``remove`` it, and what outputs it shows (``observe``); delete and read are the same
    for every kind: a missing object is a successful delete, and an empty id on read.
    """

    KIND: ClassVar[str] = "object"

    def refuse_existing(self, conn: Any, props: dict[str, Any], how_to_remove: str) -> None:
        """Before creating: an object of that name that Pulumi does not track is never taken over."""
        if self.find(conn, props) is not None:
            raise LibvirtError(f"{self.KIND} {props['name']!r} already exists outside this stack; remove it "
                               f"({how_to_remove}) or rename the cluster")

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
        """Remove the object; one already gone is success."""
        with connect(props["uri"]) as conn:
            obj = self.find(conn, props)
            if obj is not None:
                self.remove(obj, props)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """What libvirt holds now; an empty id when the object was removed behind Pulumi's back."""
        with connect(props["uri"]) as conn:
            obj = self.find(conn, props)
            if obj is None:
                return ReadResult(None, {})
            return ReadResult(id_, self.observe(obj, props))
