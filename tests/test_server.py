"""Garbage on the control socket: every bad request gets its exact error code or is dropped, never a dead primary.

Raw pyzmq sockets (DEALER with and without the REQ delimiter, and REQ) talk to a
real primary (``--huge-pages off``, so no hugepages are needed). Each case sends
one bad thing, checks the reply code and class (or that nothing comes back), then
checks that the primary still answers ``hello`` and ``reserve``. Every receive
polls with a timeout, so a hung primary fails a test instead of blocking it.

Most tests share one primary per module (starting one per case would take most
of a minute); it is restarted if a case killed it, and at the end it must exit 0
on SIGTERM and leave nothing behind. ``test_status_counts_every_refusal`` runs
the whole corpus against a primary of its own and checks the ``status`` counters.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from conftest import Primary, leftovers

from hugeshmd.errors import AlreadyExists, InvalidArgument, NotFound, OutOfMemory, ProtocolError
from hugeshmd.wire.protocol import MAX_MESSAGE

pytestmark = pytest.mark.process

ARGS = ("--memory", "16M", "--huge-pages", "off")
TIMEOUT_MS = 5000  # a reply that takes longer than this counts as a hang
DROP_MS = 1000  # how long "no reply" is waited for

PROTOCOL, INVALID, EXISTS, MISSING, NOMEM = (ProtocolError.code, InvalidArgument.code, AlreadyExists.code,
                                             NotFound.code, OutOfMemory.code)
KIND = {c.code: c.__name__ for c in (ProtocolError, InvalidArgument, AlreadyExists, NotFound, OutOfMemory)}


# -- building requests, including ones msgpack.packb will not produce ------------------------------------------


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def req(op: Any = "hello", **args: Any) -> bytes:
    return pack({"v": 1, "op": op, **args})


def reserve(**args: Any) -> bytes:
    return req("reserve", **{"name": "bad-input", "size": 4096, **args})


def raw_map(*items: bytes) -> bytes:
    """A fixmap of already-encoded keys and values (for strings that are not UTF-8, mixed key types...)."""
    assert len(items) % 2 == 0 and len(items) <= 30
    return bytes([0x80 | len(items) // 2]) + b"".join(items)


def nested(depth: int) -> bytes:
    """``depth`` one-element arrays around nil: 1 byte per level, so deep nesting stays tiny."""
    return b"\x91" * depth + b"\xc0"


NOT_UTF8 = b"\xa2\xff\xfe"  # a msgpack str of two bytes that are not UTF-8
RANDOM = random.Random(20240601).randbytes(256)
NAME_MAX = 63  # bytes of UTF-8 (hugeshmd.shm.layout.NAME_MAX)




# (id, request body, expected error code); each body is sent as one frame from a DEALER.
REFUSED = [
    # not a msgpack map
    pytest.param(b"\xc1", PROTOCOL, id="never-used-byte"),
    pytest.param(RANDOM, PROTOCOL, id="random-bytes"),
    pytest.param(b"", PROTOCOL, id="empty-body"),
    pytest.param(pack([1, 2, 3]), PROTOCOL, id="list"),
    pytest.param(pack(1), PROTOCOL, id="int"),
    pytest.param(pack("hello"), PROTOCOL, id="str"),
    pytest.param(pack(None), PROTOCOL, id="nil"),
    pytest.param(req()[:-1], PROTOCOL, id="truncated-map"),
    pytest.param(req() + b"\xc0", PROTOCOL, id="map-then-extra-data"),
    pytest.param(raw_map(pack(1), pack(1)), PROTOCOL, id="int-key"),
    pytest.param(raw_map(NOT_UTF8, pack(1)), PROTOCOL, id="non-utf8-key"),
    pytest.param(pack({f"k{i}": i for i in range(65)}), PROTOCOL, id="map-over-64-keys"),
    pytest.param(req(id="x" * 4097), PROTOCOL, id="str-over-4096"),
    pytest.param(req(id=b"x" * 4097), PROTOCOL, id="bin-over-4096"),
    pytest.param(req(id=list(range(4097))), PROTOCOL, id="array-over-4096"),
    pytest.param(req(id=msgpack.ExtType(5, b"x")), PROTOCOL, id="ext-type"),
    pytest.param(req(id=msgpack.Timestamp(0)), PROTOCOL, id="timestamp-ext"),
    pytest.param(b"\x82\xa1v\x01\xa2op" + nested(1100), PROTOCOL, id="nested-deeper-than-msgpack-stack"),
    # version
    pytest.param(pack({"op": "hello"}), PROTOCOL, id="no-v"),
    pytest.param(pack({"v": 2, "op": "hello"}), PROTOCOL, id="v-2"),
    pytest.param(pack({"v": "1", "op": "hello"}), PROTOCOL, id="v-str"),
    pytest.param(pack({"v": None, "op": "hello"}), PROTOCOL, id="v-nil"),
    pytest.param(pack({"v": 0, "op": "hello"}), PROTOCOL, id="v-0"),
    pytest.param(pack({b"v": 1, "op": "hello"}), PROTOCOL, id="v-bytes-key"),
    pytest.param(pack({"v": True, "op": "hello"}), PROTOCOL, id="v-true"),
    pytest.param(pack({"v": 1.0, "op": "hello"}), PROTOCOL, id="v-float"),
    # operation
    pytest.param(pack({"v": 1}), PROTOCOL, id="no-op"),
    pytest.param(req("explode"), PROTOCOL, id="op-unknown"),
    pytest.param(req(""), PROTOCOL, id="op-empty"),
    pytest.param(req("HELLO"), PROTOCOL, id="op-wrong-case"),
    pytest.param(req("__init__"), PROTOCOL, id="op-dunder"),
    pytest.param(req(7), PROTOCOL, id="op-int"),
    pytest.param(req(b"hello"), PROTOCOL, id="op-bytes"),
    pytest.param(req(None), PROTOCOL, id="op-nil"),
    pytest.param(req(["hello"]), PROTOCOL, id="op-list"),
    pytest.param(req({"hello": 1}), PROTOCOL, id="op-map"),
    pytest.param(b"\x82\xa1v\x01\xa2op" + nested(1010), PROTOCOL, id="op-nested-1010"),
    pytest.param(b"\x82\xa1v" + nested(1010) + b"\xa2op\xa5hello", PROTOCOL, id="v-nested-1010"),
    # arguments of argument-less commands
    pytest.param(req("hello", extra=1), INVALID, id="hello-unknown-argument"),
    pytest.param(req("status", name="x"), INVALID, id="status-unknown-argument"),
    pytest.param(pack({"v": 1, "op": "hello", b"extra": 1}), INVALID, id="hello-unknown-bytes-key"),
    pytest.param(pack({"v": 1, "op": "hello", "x": 1, b"y": 2}), INVALID, id="hello-unknown-str-and-bytes-keys"),
    # reserve: name
    pytest.param(req("reserve", size=4096), INVALID, id="reserve-no-name"),
    pytest.param(reserve(name=""), INVALID, id="name-empty"),
    pytest.param(reserve(name="n" * (NAME_MAX + 1)), INVALID, id="name-64-bytes"),
    pytest.param(reserve(name="n" * 1000), INVALID, id="name-1000-bytes"),
    pytest.param(reserve(name="é" * 32), INVALID, id="name-32-chars-64-bytes"),
    pytest.param(reserve(name="a\0b"), INVALID, id="name-with-nul"),
    pytest.param(reserve(name=b"bin-name"), INVALID, id="name-bin"),
    pytest.param(reserve(name=7), INVALID, id="name-int"),
    pytest.param(reserve(name=None), INVALID, id="name-nil"),
    pytest.param(reserve(name=["a"]), INVALID, id="name-list"),
    # A str that is not UTF-8 fails decoding of the whole message, before any validator.
    pytest.param(raw_map(pack("v"), pack(1), pack("op"), pack("reserve"), pack("name"), NOT_UTF8,
                         pack("size"), pack(4096)), PROTOCOL, id="name-not-utf8"),
    # reserve: size
    pytest.param(req("reserve", name="bad-input"), INVALID, id="reserve-no-size"),
    pytest.param(reserve(size="10"), INVALID, id="size-str"),
    pytest.param(reserve(size=1.5), INVALID, id="size-float"),
    pytest.param(reserve(size=4096.0), INVALID, id="size-integral-float"),
    pytest.param(reserve(size=float("nan")), INVALID, id="size-nan"),
    pytest.param(reserve(size=True), INVALID, id="size-true"),
    pytest.param(reserve(size=None), INVALID, id="size-nil"),
    pytest.param(reserve(size=b"\x10\x00"), INVALID, id="size-bin"),
    pytest.param(reserve(size=-1), INVALID, id="size-negative"),
    pytest.param(reserve(size=-(2**63)), INVALID, id="size-int64-min"),
    pytest.param(reserve(size=0), INVALID, id="size-zero"),
    pytest.param(reserve(size=2**62 + 1), INVALID, id="size-over-2**62"),
    pytest.param(reserve(size=2**63), INVALID, id="size-2**63-uint64"),
    pytest.param(reserve(size=2**64 - 1), INVALID, id="size-uint64-max"),
    pytest.param(reserve(size=2**62), NOMEM, id="size-2**62-out-of-memory"),
    pytest.param(reserve(size=16 * 2**20 + 1), NOMEM, id="size-memory-plus-one"),
    # reserve: align
    pytest.param(reserve(align=3), INVALID, id="align-3"),
    pytest.param(reserve(align=0), INVALID, id="align-0"),
    pytest.param(reserve(align=-64), INVALID, id="align-negative"),
    pytest.param(reserve(align=2**31), INVALID, id="align-over-1GiB"),
    pytest.param(reserve(align=2**63), INVALID, id="align-2**63"),
    pytest.param(reserve(align="64"), INVALID, id="align-str"),
    pytest.param(reserve(align=64.0), INVALID, id="align-float"),
    pytest.param(reserve(align=True), INVALID, id="align-true"),
    pytest.param(reserve(extra=1), INVALID, id="reserve-unknown-argument"),
    # lookup and free
    pytest.param(req("lookup"), INVALID, id="lookup-no-name"),
    pytest.param(req("lookup", name=1), INVALID, id="lookup-name-int"),
    pytest.param(req("lookup", name="x", size=1), INVALID, id="lookup-unknown-argument"),
    pytest.param(req("free", name=b"bad-input"), INVALID, id="free-name-bin"),
    pytest.param(req("free", name=""), INVALID, id="free-name-empty"),
    pytest.param(req("lookup", name="no-such-zone"), MISSING, id="lookup-missing"),
    pytest.param(req("free", name="no-such-zone"), MISSING, id="free-missing"),
]

# Frames a DEALER sends that fit neither REQ framing [b"", body] nor DEALER framing [body]: dropped.
MALFORMED = [
    pytest.param([b"x", req()], id="3-frames-non-empty-middle"),
    pytest.param([b"", b"", req()], id="4-frames-two-delimiters"),
    pytest.param([b"a", b"", req()], id="4-frames-routing-prefix"),
    pytest.param([req()] * 3, id="3-frames-of-requests"),
    pytest.param([b"f"] * 20, id="20-frames"),
    pytest.param([b"z" * 60_000] * 4, id="4-frames-of-60KB"),
]


# -- raw sockets -----------------------------------------------------------------------------------------------


class Client:
    """Raw sockets to one primary's control endpoint; all closed with LINGER 0 by :meth:`close`."""

    def __init__(self, context: zmq.Context, endpoint: str, pid: int) -> None:
        self.context, self.endpoint, self.pid = context, endpoint, pid
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind: int = zmq.DEALER) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)  # a full pipe fails the test instead of blocking it
        sock.connect(self.endpoint)
        self.sockets.append(sock)
        return sock

    def call(self, body: bytes, sock: zmq.Socket | None = None) -> dict[str, Any]:
        """Send ``body`` in DEALER framing and return the decoded one-frame reply."""
        if sock is None:
            sock = self.socket()
        sock.send(body)
        frames = receive(sock)
        assert frames is not None, f"no reply within {TIMEOUT_MS} ms"
        assert len(frames) == 1, frames
        return decode(frames[0])

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        return self.call(req(op, **args))

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.request(op, **args)
        assert reply.get("ok") is True and reply.get("v") == 1, reply
        return reply

    def assert_serving(self) -> None:
        """The primary (the same process) answers hello, and reserves and frees a zone."""
        assert self.ok("hello")["pid"] == self.pid
        name = f"alive-{uuid.uuid4().hex[:12]}"
        zone = self.ok("reserve", name=name, size=4096)
        assert (zone["name"], zone["size"]) == (name, 4096)
        assert self.ok("free", name=name)["address"] == zone["address"]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()


def receive(sock: zmq.Socket, timeout_ms: int = TIMEOUT_MS) -> list[bytes] | None:
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return sock.recv_multipart(zmq.NOBLOCK)


def decode(frame: bytes) -> dict[str, Any]:
    reply = msgpack.unpackb(frame, raw=False)
    assert isinstance(reply, dict), reply
    return reply


def assert_refused(reply: dict[str, Any], code: int) -> None:
    assert reply.get("v") == 1 and reply.get("ok") is False, reply
    assert (reply.get("code"), reply.get("error")) == (code, KIND[code]), reply
    assert isinstance(reply.get("message"), str) and reply["message"], reply


class SharedPrimary:
    """One primary for the module, restarted if a case killed it; every one is checked at teardown."""

    def __init__(self) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.root = tempfile.mkdtemp(prefix="hsd", dir="/tmp")  # short: ipc paths must fit sun_path
        self.endpoint = f"ipc://{self.root}/{self.prefix}/control"
        self.context = zmq.Context()
        self.started: list[Primary] = []

    def current(self) -> Primary:
        if not self.started or self.started[-1].proc.poll() is not None:
            self.started.append(Primary(self.prefix, self.root, *ARGS))  # listed first: stopped even if not ready
            self.started[-1].wait_ready()
        return self.started[-1]

    def close(self) -> None:
        try:
            codes = [primary.stop() for primary in self.started]
            logs = "\n".join(primary.text for primary in self.started)
            assert codes[-1:] in ([], [0]), f"exit {codes[-1]} on SIGTERM:\n{logs}"
            assert codes.count(0) == len(codes), f"a primary died during the module: {codes}\n{logs}"
            assert leftovers(self.prefix, self.root) == [], logs
        finally:
            self.context.term()
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[SharedPrimary]:
    holder = SharedPrimary()
    yield holder
    holder.close()


@pytest.fixture
def client(shared: SharedPrimary) -> Iterator[Client]:
    primary = shared.current()
    made = Client(shared.context, shared.endpoint, primary.proc.pid)
    yield made
    made.close()


# -- the corpus ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code"), REFUSED)
def test_refused_with_exact_code(client: Client, body: bytes, code: int) -> None:
    assert_refused(client.call(body), code)
    client.assert_serving()


def test_zone_lifecycle(client: Client) -> None:
    name = f"life-{uuid.uuid4().hex[:8]}"
    zone = client.ok("reserve", name=name, size=10_000, align=4096)
    assert zone["address"] % 4096 == 0 and zone["size"] == 10_000
    assert_refused(client.request("reserve", name=name, size=4096), EXISTS)
    assert_refused(client.request("reserve", name=name, size=10_000, align=4096), EXISTS)
    assert client.ok("lookup", name=name)["address"] == zone["address"]
    assert client.ok("free", name=name)["address"] == zone["address"]
    assert_refused(client.request("lookup", name=name), MISSING)
    assert_refused(client.request("free", name=name), MISSING)
    client.assert_serving()


@pytest.mark.parametrize("name", ["n" * NAME_MAX, "€" * (NAME_MAX // 3), "z"], ids=["63-ascii", "63-bytes-utf8", "1"])
def test_name_length_boundary_accepted(client: Client, name: str) -> None:
    zone = client.ok("reserve", name=name, size=64, align=None)  # nil align means the default
    assert zone["name"] == name and zone["address"] % 64 == 0
    assert client.ok("lookup", name=name)["address"] == zone["address"]
    client.ok("free", name=name)


# -- framing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", MALFORMED)
def test_malformed_framing_dropped(client: Client, frames: list[bytes]) -> None:
    sock = client.socket()
    sock.send_multipart(frames)
    assert receive(sock, DROP_MS) is None, "a request of the wrong frame count was answered"
    # The same connection still works, and the next reply on it is the hello's, not a late one.
    reply = client.call(req("hello", id=77), sock)
    assert reply["ok"] is True and reply["id"] == 77, reply
    client.assert_serving()


def test_dealer_framing_reply_is_one_frame(client: Client) -> None:
    sock = client.socket()
    sock.send(req("hello", id=1))
    frames = receive(sock)
    assert frames is not None and len(frames) == 1, frames
    assert decode(frames[0])["id"] == 1


def test_dealer_with_delimiter_gets_req_framing(client: Client) -> None:
    sock = client.socket()
    sock.send_multipart([b"", req("hello", id=2)])
    frames = receive(sock)
    assert frames is not None and len(frames) == 2 and frames[0] == b"", frames
    assert decode(frames[1])["id"] == 2
    sock.send_multipart([b"", b"\xc1"])  # garbage in REQ framing is answered in REQ framing too
    frames = receive(sock)
    assert frames is not None and len(frames) == 2 and frames[0] == b"", frames
    assert_refused(decode(frames[1]), PROTOCOL)


def test_req_socket(client: Client) -> None:
    sock = client.socket(zmq.REQ)
    sock.send(req("hello", id=4))
    frames = receive(sock)
    assert frames is not None and len(frames) == 1, frames
    assert decode(frames[0])["id"] == 4
    for body, code in ((b"\xc1", PROTOCOL), (reserve(size=0), INVALID), (req("lookup", name="no-such"), MISSING)):
        sock.send(body)
        frames = receive(sock)
        assert frames is not None and len(frames) == 1, frames
        assert_refused(decode(frames[0]), code)
    client.assert_serving()


# -- size, disconnects, ids, bursts ----------------------------------------------------------------------------


def test_message_at_limit_answered(client: Client) -> None:
    sock = client.socket()
    sock.send(b"\xc1" * MAX_MESSAGE)
    frames = receive(sock)
    assert frames is not None, "a message of exactly MAX_MESSAGE bytes was not answered"
    assert_refused(decode(frames[0]), PROTOCOL)
    client.assert_serving()


@pytest.mark.parametrize("size", [MAX_MESSAGE + 1, 4 << 20], ids=["64KiB+1", "4MiB"])
def test_oversized_message_survived(client: Client, size: int) -> None:
    over = client.socket()
    over.send(b"\xc1" * size)
    late = receive(over, DROP_MS)  # none once libzmq enforces ZMQ_MAXMSGSIZE (see the next test)
    assert late is None or assert_refused(decode(late[0]), PROTOCOL) is None
    client.assert_serving()  # other clients are served
    assert client.call(req("hello", id=3), over)["id"] == 3  # so is this one, after its DEALER reconnects


def test_oversized_message_disconnects_the_peer(client: Client) -> None:
    over = client.socket()
    over.send(b"\xc1" * (MAX_MESSAGE + 1))
    assert receive(over, DROP_MS) is None, "an oversized message was read and answered"
    client.assert_serving()
    assert client.call(req("hello", id=3), over)["id"] == 3  # libzmq dropped the connection; it reconnects


@pytest.mark.parametrize("kind", [zmq.DEALER, zmq.REQ], ids=["dealer", "req"])
def test_client_gone_before_reply(client: Client, kind: int) -> None:
    names = [f"gone-{uuid.uuid4().hex[:8]}" for _ in range(10)]
    for name in names:
        context = zmq.Context()
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 2000)  # deliver the request, then vanish without reading the reply
        sock.connect(client.endpoint)
        sock.send(req("reserve", name=name, size=4096))
        sock.close()
        context.term()
    for name in names:  # each request was served even though nobody read its reply
        reply = client.call(req("lookup", name=name))
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while reply.get("code") == MISSING and time.monotonic() < deadline:  # may still be in the primary's queue
            time.sleep(0.01)
            reply = client.call(req("lookup", name=name))
        assert reply["ok"] is True, reply
        client.ok("free", name=name)
    client.assert_serving()


ECHOED = [7, 0, -1, 2**64 - 1, -(2**63), "abc", "", "é" * 5]
NOT_ECHOED = [True, False, None, 1.5, b"bin", [1], {"a": 1}]


@pytest.mark.parametrize("request_id", ECHOED, ids=repr)
def test_request_id_echoed(client: Client, request_id: int | str) -> None:
    for body in (req("hello", id=request_id), req("explode", id=request_id), reserve(size=-1, id=request_id),
                 pack({"v": 2, "op": "hello", "id": request_id})):
        reply = client.call(body)
        assert "id" in reply and reply["id"] == request_id and type(reply["id"]) is type(request_id), reply


@pytest.mark.parametrize("request_id", NOT_ECHOED, ids=repr)
def test_other_ids_not_echoed(client: Client, request_id: Any) -> None:
    for body in (req("hello", id=request_id), req("explode", id=request_id)):
        assert "id" not in client.call(body)


def test_burst_of_garbage_does_not_starve_others(client: Client) -> None:
    rng = random.Random(7)
    noisy = client.socket()
    noisy.setsockopt(zmq.RCVHWM, 0)  # unlimited: the primary drops no reply to this peer
    for i in range(2000):
        noisy.send(rng.randbytes(rng.randrange(0, 64)) if i % 2 else b"\xc1")  # SNDTIMEO: a full pipe fails
    assert client.ok("hello", id="after-burst")["id"] == "after-burst"  # another peer is served meanwhile
    # One pipe keeps its order: the marker's reply comes after the replies to all 2000 before it.
    noisy.send(req("hello", id="marker"))
    refusals = 0
    while (frames := receive(noisy)) is not None:
        reply = decode(frames[0])
        if reply.get("id") == "marker":
            break
        assert_refused(reply, PROTOCOL)
        refusals += 1
    assert refusals == 2000
    client.assert_serving()


def test_error_reply_stays_within_max_message(client: Client) -> None:
    nils = b"\xdc\x10\x00" + b"\xc0" * 4096  # an array of 4096 nils, 4099 bytes
    body = b"\x82\xa1v\x01\xa2op\xdc\x00\x0f" + nils * 15
    assert len(body) <= MAX_MESSAGE
    reply = client.socket()
    reply.send(body)
    frames = receive(reply)
    assert frames is not None
    assert_refused(decode(frames[0]), PROTOCOL)
    assert len(frames[0]) <= MAX_MESSAGE, f"a {len(body)}-byte request got a {len(frames[0])}-byte reply"


# -- counters and a clean exit ---------------------------------------------------------------------------------


def _unmarked(params: list[Any]) -> list[Any]:
    return [p.values for p in params if not p.marks]


def test_status_counts_every_refusal(start_primary: Any, prefix: str, root: str) -> None:
    primary = start_primary(*ARGS)
    context = zmq.Context()
    client = Client(context, f"ipc://{root}/{prefix}/control", primary.proc.pid)
    try:
        expected: dict[str, int] = {}
        sent = 0
        for body, code in _unmarked(REFUSED):
            assert_refused(client.call(body), code)
            expected[KIND[code]] = expected.get(KIND[code], 0) + 1
            sent += 1
        sock = client.socket()
        for (frames,) in _unmarked(MALFORMED):
            sock.send_multipart(frames)
            assert client.call(req("hello", id=sent), sock)["id"] == sent  # the malformed one got no reply
            expected["MalformedFrame"] = expected.get("MalformedFrame", 0) + 1
            sent += 2
        status = client.ok("status")
        assert status["requests"] >= sent + 1 > len(REFUSED) + len(MALFORMED), status
        assert status["errors"] == expected, status
        client.assert_serving()
    finally:
        client.close()
        context.term()
    assert primary.stop(signal.SIGTERM) == 0, primary.text
    assert "Traceback" not in primary.text, primary.text
    assert leftovers(prefix, root) == [] and not os.path.exists(os.path.join(root, prefix))
