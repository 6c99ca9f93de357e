"""The daemon's floor: the primary and what only it runs.

May import :mod:`hugeshmd.shm`, :mod:`hugeshmd.wire`, ZeroMQ, msgpack and
posix_ipc; nothing under :mod:`hugeshmd.host` or the CLI.

* :mod:`.primary`: the lifecycle (start steps with their undo, serve, reload, shutdown).
* :mod:`.server`: requests, with the handler table beside the command list.
* :mod:`.publisher`: the numbered change stream.
* :mod:`.access`: the instance's group, file modes, the ZAP check.
* :mod:`.backing`: hugetlbfs or /dev/shm, and the choice between them.
* :mod:`.predecessor`: what a dead primary left, found and cleared (the one path).
* :mod:`.adoption`: verifying a dead primary's instance for a new primary to take over.
* :mod:`.hugepages`: the host's pools and mounts, as the primary reads them.
* :mod:`.config`: options from defaults, a TOML file and flags.
* :mod:`.systemd`: sd_notify and journal-aware logs.
"""
