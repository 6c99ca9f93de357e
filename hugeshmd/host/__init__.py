"""The host tools' floor: what only the ``hugeshmd`` command runs, never a primary or a worker.

May import every floor below (:mod:`hugeshmd.daemon` for the config and the
host's pools, :mod:`hugeshmd.wire`, :mod:`hugeshmd.shm`).

* :mod:`.pool`: resize hugepage pools, mount and unmount hugetlbfs.
* :mod:`.census`: which instance holds which files (live, in use, stale), the
  ``hugepages show`` report, and ``cleanup``.
* :mod:`.install`: the systemd units, the service user, the pre-start.
* :mod:`.metrics`: the Prometheus text format.
* :mod:`.files`: atomic writes of files others read.
"""
