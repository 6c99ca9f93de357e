"""The worker's floor: everything ``import hugeshmd`` loads, and all a worker needs to
attach, look up, reserve and free.

Only the standard library and ctypes (through :mod:`hugeshmd._sys`) below this
line: no ZeroMQ, msgpack or posix_ipc (``tests/test_layers.py`` holds the
fence). A worker reaches :mod:`hugeshmd.wire` only on a slow path, to wait for
a primary that is not up yet.

* :mod:`.paths`: every name of an instance on the host.
* :mod:`.lock`: the primary's lifetime lock.
* :mod:`.identity`: a process as pid plus start time, across pid reuse.
* :mod:`.layout`: the table file's format, every struct and offset.
* :mod:`.snapshot`: one committed version and its indexes.
* :mod:`.table`: the mapped table: lock-free reads, crash-atomic commits.
* :mod:`.registry`: the worker entries and owner tokens.
* :mod:`.guard`: a table truncated under this process is TableCorrupt, not a SIGBUS.
* :mod:`.window`: the reserved address range, segments mapped inside.
* :mod:`.zones`: named zones, placement, the Zone objects.
* :mod:`.secondary`: ``attach`` and the worker's handle.

Loaded only when asked for, never by ``import hugeshmd``:

* :mod:`.interop`: zero-copy PyTorch tensors and Arrow buffers (``.torch()``, ``.arrow()``).
* :mod:`.cuda`: the instance's segments registered with CUDA (``cuda_register``), over
  :mod:`hugeshmd._cudart`.
"""
