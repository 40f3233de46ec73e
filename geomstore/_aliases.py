"""Old keyword spellings kept working (with a DeprecationWarning) after a rename."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["renamed_kwargs"]

P = ParamSpec("P")
R = TypeVar("R")


def renamed_kwargs(**renames: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Accept ``old=`` for each ``old="new"`` pair, warn, and pass it on as ``new=``.

    Examples
    --------
    >>> import warnings
    >>> @renamed_kwargs(slice_="slice")
    ... def f(*, slice: str) -> str:
    ...     return slice
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     f(slice_="plane"), w[0].category.__name__
    ('plane', 'DeprecationWarning')
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__qualname__}() got both {old}= and {new}=; pass only {new}=."
                        )
                    warnings.warn(
                        f"{fn.__qualname__}({old}=...) is deprecated; use {new}=...",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
