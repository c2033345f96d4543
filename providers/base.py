"""What every dynamic provider of this project shares: input checks and diff."""

from __future__ import annotations

from typing import Any, ClassVar

from pulumi.dynamic import CheckFailure, CheckResult, DiffResult, ResourceProvider
from pulumi.output import Unknown

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

    def check_values(self, news: dict[str, Any]) -> list[CheckFailure]:
        """Provider-specific checks of input values; none by default."""
        return []

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        """Compare the declared keys only (never ``__provider``); libvirt names are unique, so
        a replacement deletes the old object first."""
        changed = sorted(k for k in self.REPLACE | self.UPDATE if olds.get(k) != news.get(k))
        replaces = [k for k in changed if k in self.REPLACE]
        return DiffResult(changes=bool(changed), replaces=replaces, stables=[],
                          delete_before_replace=bool(replaces))


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__
