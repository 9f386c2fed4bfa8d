"""What ``use_backend`` (:mod:`.overrides`) and ``quality`` (:mod:`.tiers`) share: a scope's block,
entered once with ``with`` or ``async with``, or put around every call of a function as a decorator.

A decorated ``async def`` runs its body inside the scope: the block is opened when the coroutine
starts running, in the task that runs it, and closed when it returns, so the scope is the task's
while it runs, and never another task's (each asyncio task runs in a copy of the context it was
made in). contextlib's decorator (``ContextDecorator``) opened it only around the *creation* of the
coroutine object, before its body ran. A generator function is refused: its body runs between the
caller's own statements, where a scope would leak. No torch here.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, ContextManager


def decorate(func: Callable, make: Callable[[], ContextManager], label: str) -> Callable:
    """``func`` with a fresh ``make()`` block around each call; for a coroutine function, around
    each run of its coroutine. ``label`` (``quality('fast')``) names the scope in the refusal."""
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"{label} cannot decorate the generator function {func.__qualname__}: open "
                        f"`with {label}:` inside it, around its attention calls")
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def scoped_coroutine(*args, **kwargs):
            with make():
                return await func(*args, **kwargs)
        return scoped_coroutine

    @functools.wraps(func)
    def scoped(*args, **kwargs):
        with make():
            return func(*args, **kwargs)
    return scoped


class Block:
    """One block of a scope: ``make()`` is the context manager that sets the scope and restores it
    (a fresh one for each call of a decorated function). Entered once, as a generator-based context
    manager is; as a decorator, :func:`decorate`."""

    __slots__ = ("_make", "_label", "_cm")

    def __init__(self, make: Callable[[], ContextManager], label: str) -> None:
        self._make = make
        self._label = label
        self._cm = None

    def __enter__(self):
        if self._cm is not None:
            raise RuntimeError(f"a {self._label} block is entered once: call {self._label} again for another")
        self._cm = self._make()
        return self._cm.__enter__()

    def __exit__(self, *exc) -> bool:
        return bool(self._cm.__exit__(*exc))

    async def __aenter__(self):
        return self.__enter__()

    async def __aexit__(self, *exc) -> bool:
        return self.__exit__(*exc)

    def __call__(self, func: Callable) -> Callable:
        return decorate(func, self._make, self._label)
