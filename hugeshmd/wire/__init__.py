"""The wire: the control protocol (msgpack maps) and the ZeroMQ clients of a primary.

Above :mod:`hugeshmd.shm` and below the daemon. Imports ZeroMQ and msgpack,
which is why nothing on a worker's fast path imports this package: a worker
comes here only to wait for a primary (``attach``'s slow path).
"""
