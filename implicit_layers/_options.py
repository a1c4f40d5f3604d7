"""Solver objects are frozen keyword-only dataclasses whose fields are their options.

:func:`options` makes such a class and turns a misspelt option into an error that names it, lists
the valid options and suggests the closest one. The ``check_*`` helpers validate option values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, TypeVar

from typing_extensions import dataclass_transform

T = TypeVar("T", bound=type)


@dataclass_transform(kw_only_default=True, frozen_default=True)
def options(cls: T) -> T:
    """Class decorator: a frozen, keyword-only dataclass with a helpful unknown-option error."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)  # type: ignore[assignment]
    generated_init = cls.__init__  # type: ignore[misc]
    names = [field.name for field in dataclasses.fields(cls)]

    @functools.wraps(generated_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = [key for key in kwargs if key not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise TypeError(
                f"{cls.__name__} got an unknown option `{key}`; its options are "
                f"{', '.join(names) or 'none'}.{hint}"
            )
        if args:
            raise TypeError(
                f"{cls.__name__} takes its options by keyword only ({', '.join(names)}), "
                f"got {len(args)} positional argument(s)."
            )
        generated_init(self, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def check_positive_int(owner: object, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{type(owner).__name__}: `{name}` must be a positive integer, got {value!r}. "
            "A budget of zero iterations would return a meaningless result."
        )


def check_nonnegative(owner: object, name: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 <= value < float("inf"):  # NaN fails too
        raise ValueError(
            f"{type(owner).__name__}: `{name}` must be a non-negative number, finite, got "
            f"{value!r}."
        )


def check_bool(owner: object, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{type(owner).__name__}: `{name}` must be True or False, got {value!r}.")


def check_in_interval(owner: object, name: str, value: Any, low: float, high: float) -> None:
    """``low < value <= high``, and finite."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not low < value <= high or value == float("inf"):
        raise ValueError(
            f"{type(owner).__name__}: `{name}` must lie in ({low}, {high}] and be finite, "
            f"got {value!r}."
        )
