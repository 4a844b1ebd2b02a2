"""Keyword aliases for argument names of other libraries (lightly) that mean the same."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["accepts_aliases"]

F = TypeVar("F", bound=Callable[..., Any])


def accepts_aliases(**aliases: str) -> Callable[[F], F]:
    """Let a function (an ``__init__``) take ``alias=value`` for ``ours=value``.

    Each keyword ``alias`` found in a call is renamed to ``aliases[alias]`` before the
    call; passing both names raises ``TypeError`` naming both (there is no way to tell
    which one was meant).

    Args:
        **aliases: ``alias="our_name"`` pairs.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for alias, ours in aliases.items():
                if alias in kwargs:
                    if ours in kwargs:
                        raise TypeError(
                            f"{fn.__qualname__} got both {ours}= and its alias {alias}= "
                            f"(lightly's name); pass only one"
                        )
                    kwargs[ours] = kwargs.pop(alias)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
