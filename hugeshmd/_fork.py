"""What a forked child must not inherit: other threads' held locks, half-made lock descriptors.

Some facts about fork(2) that the table, the worker and the window rely on:

* The child has one thread, a copy of the one that forked. A lock that another
  thread held at that moment stays held in the child forever, so every lock a
  child may take is made anew in it (objects :func:`register` themselves and
  get ``_after_fork()`` called in the child).
* The child shares the parent's open file descriptions, and with them any
  flock they carry. Lock descriptors are closed in the child (it opens its own
  when it needs one), and :data:`guard` is held across fork by a before-fork
  handler, so that no descriptor is half-made or half-closed when fork copies
  the descriptor table.
* :data:`epoch` counts the forks this process descends from; a lock context
  entered before a fork sees, on exit in the child, that it holds nothing.

guard protects only short sections (an open(2), an mmap(2)): never hold it
while waiting for anything.
"""

from __future__ import annotations

import _thread
import os
import weakref

__all__ = ["guard", "epoch", "register"]

guard = _thread.allocate_lock()
epoch = 0
_objects: weakref.WeakSet[object] = weakref.WeakSet()


def register(obj: object) -> None:
    """Have ``obj._after_fork()`` called in every child forked from now on."""
    _objects.add(obj)


def _before() -> None:
    guard.acquire()


def _after_in_parent() -> None:
    guard.release()


def _after_in_child() -> None:
    global guard, epoch
    guard = _thread.allocate_lock()
    epoch += 1
    for obj in list(_objects):
        obj._after_fork()  # type: ignore[attr-defined]


os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
