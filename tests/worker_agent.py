"""A worker process driven by a test: one JSON command per stdin line, one JSON reply per line.

Lets a test hold several attached workers alive at once and interleave them.
Errors come back as {"error": class name, "message": ...}, never as a crash.
"""

import json
import sys

import hugeshmd

state: dict = {}


def zone_dict(zone: hugeshmd.Zone) -> dict:
    return {"name": zone.name, "address": zone.address, "size": zone.size, "iova": zone.iova}


def run(cmd: dict) -> dict:
    op = cmd["op"]
    shm = state.get("shm")
    if op == "attach":
        state["shm"] = shm = hugeshmd.attach(cmd["prefix"], timeout=cmd.get("timeout", 5.0),
                                             lock_timeout=cmd.get("lock_timeout", 5.0))
        return {"base": shm.base, "segments": [[s.address, s.length, s.path] for s in shm.segments]}
    if op == "reserve":
        return zone_dict(shm.reserve(cmd["name"], cmd["size"], cmd.get("align")))
    if op == "lookup":
        return zone_dict(shm.lookup(cmd["name"]))
    if op == "free":
        shm.free(cmd["name"])
        return {}
    if op == "zones":
        return {"zones": [zone_dict(z) for z in shm.zones]}
    if op == "write":
        zone = shm.lookup(cmd["name"])
        data = bytes.fromhex(cmd["hex"])
        memoryview(zone)[cmd["offset"] : cmd["offset"] + len(data)] = data
        return {}
    if op == "read":
        zone = shm.lookup(cmd["name"])
        return {"hex": bytes(memoryview(zone)[cmd["offset"] : cmd["offset"] + cmd["length"]]).hex()}
    if op == "hold":  # keep a Zone object alive across close()
        state.setdefault("held", []).append(shm.lookup(cmd["name"]))
        return {}
    if op == "read_held":
        return {"hex": bytes(memoryview(state["held"][-1])[: cmd["length"]]).hex()}
    if op == "drop_held":
        state.pop("held", None)
        return {}
    if op == "maps":
        base = cmd["base"]
        with open("/proc/self/maps") as maps:
            return {"lines": [line.strip() for line in maps if int(line.split("-")[0], 16) >= base
                              and int(line.split("-")[0], 16) < base + cmd["size"]]}
    if op == "primary":
        return shm.primary._asdict()
    if op == "checksums":  # every zone's name and the CRC-32 of its bytes
        import zlib

        return {"zones": {z.name: zlib.crc32(memoryview(z)) for z in shm.zones}}
    if op == "close":
        shm.close()
        return {}
    if op == "alloc":  # keep the Buffer: this worker owns it
        buf = shm.alloc(cmd["size"], cmd.get("align"))
        if "hex" in cmd:
            data = bytes.fromhex(cmd["hex"])
            buf.view()[: len(data)] = data
        state.setdefault("bufs", {})[buf.address] = buf
        return {"address": buf.address, "size": buf.size}
    if op == "alloc_many":
        bufs = [shm.alloc(cmd["size"]) for _ in range(cmd["count"])]
        for buf in bufs:
            state.setdefault("bufs", {})[buf.address] = buf
        return {"addresses": [b.address for b in bufs[:10]]}
    if op == "attach_info":
        return {"segments": [[s.address, s.length, s.path] for s in shm.segments]}
    if op == "heap_read":
        buf = shm.buffer(cmd["address"])
        return {"hex": bytes(buf.view()[: cmd["length"]]).hex(), "size": buf.size}
    if op == "heap_free":
        held = state.get("bufs", {}).pop(cmd["address"], None)
        (held or shm.buffer(cmd["address"])).free()
        return {}
    if op == "disown":
        state["bufs"][cmd["address"]].disown()
        return {}
    if op == "fork_sleeper":  # a child that shares this worker's descriptions, then sleeps
        import os
        import time

        pid = os.fork()
        if pid == 0:
            time.sleep(cmd.get("seconds", 30))
            os._exit(0)
        return {"pid": pid}
    raise ValueError(f"unknown op {op}")


def main() -> None:
    for line in sys.stdin:
        try:
            reply = run(json.loads(line))
        except Exception as err:  # reported to the test, which asserts on it
            reply = {"error": type(err).__name__, "message": str(err),
                     "fields": {k: v for k, v in getattr(err, "fields", {}).items() if isinstance(v, (int, str, bool))}}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
