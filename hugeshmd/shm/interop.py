"""Zero-copy views of hugeshmd memory for other libraries: PyTorch tensors and Arrow buffers.

``Zone``, ``ReadOnlyZone`` and ``Buffer`` each have ``.torch(dtype, shape)`` and ``.arrow()``,
which land here. Each library is imported when first asked for, never by ``import hugeshmd``;
absent, it is :class:`~hugeshmd.errors.LibraryMissing` naming the pip extra that installs it.

Some facts about the two libraries that these views rely on:

* ``torch.frombuffer(buffer, dtype, count)`` makes a CPU tensor over the buffer's memory without
  copying, and keeps the buffer object alive as long as the tensor (its storage holds it). It
  warns when the buffer is read-only: PyTorch has no read-only tensors, so a write through one
  is undefined behaviour. Over a read-only zone (mapped ``PROT_READ``) it is a SIGSEGV, as for a
  write through a raw pointer: see :func:`tensor`.
* ``pyarrow.foreign_buffer(address, size, base)`` makes an Arrow buffer over memory Arrow does not
  own, keeping ``base`` alive as long as the buffer (and any array built over it). Such a buffer
  is immutable on Arrow's side (``is_mutable`` is False): writes go through ``view()``,
  ``ndarray()`` or ``torch()``, and Arrow sees them.
* Both outlive nothing: ``base`` (the Zone, the Buffer) keeps the instance's window mapped, so a
  tensor or Arrow buffer never outlives its mapping, even after the Secondary is closed. As for
  ``view()``, a view of a freed heap allocation reads whatever the next allocation writes there.
"""

from __future__ import annotations

from ..errors import InvalidArgument, LibraryMissing

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

    import pyarrow
    import torch as _torch

__all__ = ["tensor", "arrow_buffer", "elements", "EXTRAS"]

EXTRAS = {"torch": "torch", "pyarrow": "arrow", "numpy": "numpy"}  # module -> hugeshmd's pip extra


def require(module: str, what: str) -> ModuleType:
    """``import module``, or LibraryMissing saying that ``what`` needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS[module]
        raise LibraryMissing(f"{what} needs {module}, which is not installed: pip install 'hugeshmd[{extra}]' "
                             f"(or pip install {module})", name=module, extra=extra) from err


def elements(name: str, size: int, itemsize: int, shape: int | tuple[int, ...] | None,
             kind: object = "items") -> tuple[tuple[int, ...], int]:
    """(dims, element count) of ``shape`` over ``size`` bytes of items of ``itemsize`` (``kind``, for
    the message); for no shape, as many as fit, flat. InvalidArgument for a negative dimension or a
    shape that needs more bytes than there are."""
    if shape is None:
        return (size // itemsize,), size // itemsize
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    count = 1
    for dim in dims:
        if dim < 0:
            raise InvalidArgument(f"negative dimension in shape {dims}", name=name, size=size)
        count *= dim
    if count * itemsize > size:
        raise InvalidArgument(f"shape {dims} of {kind} needs {count * itemsize} bytes; zone {name!r} has {size}",
                              name=name, size=size)
    return dims, count


def tensor(view: memoryview, name: str, dtype: Any, shape: int | tuple[int, ...] | None) -> _torch.Tensor:
    """A CPU tensor over ``view`` (zero-copy), of ``dtype`` (a ``torch.dtype`` or its name, such as
    ``"float32"``) and ``shape`` (default: as many items as fit, flat).

    Over a read-only view the tensor is for reading: PyTorch has no read-only tensors, and the
    pages are mapped ``PROT_READ``, so an in-place write through it kills the process with
    SIGSEGV, like a write through a raw pointer (``.clone()`` gives a writable copy). The
    warning ``torch.frombuffer`` gives for such a buffer is silenced, since this says it.
    Raises LibraryMissing without PyTorch, InvalidArgument for an unknown dtype or a shape that
    needs more bytes than the view has.
    """
    torch = require("torch", ".torch()")
    kind = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(kind, torch.dtype):
        raise InvalidArgument(f"dtype must be a torch.dtype or the name of one, not {dtype!r}", name="dtype")
    dims, count = elements(name, len(view), kind.itemsize, shape, kind)
    if count == 0:  # frombuffer refuses an empty count: a tensor of no elements shares nothing anyway
        empty: _torch.Tensor = torch.empty(dims, dtype=kind)
        return empty
    if view.readonly:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            flat = torch.frombuffer(view, dtype=kind, count=count)
    else:
        flat = torch.frombuffer(view, dtype=kind, count=count)
    shaped: _torch.Tensor = flat.view(dims)
    return shaped


def arrow_buffer(address: int, size: int, base: object) -> pyarrow.Buffer:
    """An Arrow buffer over ``size`` bytes at ``address`` (zero-copy), keeping ``base`` (what keeps the
    memory mapped) alive. Immutable on Arrow's side. Raises LibraryMissing without pyarrow."""
    pa = require("pyarrow", ".arrow()")
    buffer: pyarrow.Buffer = pa.foreign_buffer(address, size, base=base)
    return buffer
