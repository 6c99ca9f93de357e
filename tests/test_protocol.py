"""Unit tests of hugeshmd.wire.protocol and hugeshmd.errors: frames, requests, replies, error codes."""

from __future__ import annotations

import pickle
import random

import msgpack
import pytest

from hugeshmd import errors
from hugeshmd.errors import (
    AddressUnavailable,
    AlreadyExists,
    HandleClosed,
    HugeshmdError,
    InvalidArgument,
    NotFound,
    OutOfMemory,
    PrimaryStopped,
    PrimaryUnavailable,
    ProtocolError,
    TableBusy,
    TableFull,
    error_for_code,
)
from hugeshmd.wire.protocol import (
    COMMANDS,
    MAX_MESSAGE,
    MAX_REPLY,
    VERSION,
    decode,
    encode,
    error_reply,
    ok_reply,
    parse_request,
    result_of,
)

ALL_ERRORS = list(errors.ERRORS)



# -- decode: the frame -------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    message = {
        "v": 1, "op": "reserve", "name": "日本", "size": 2**40, "neg": -5, "f": 1.5, "none": None,
        "flag": True, "raw": b"\x00\xff", "list": [1, "a", [2]], "map": {"k": {"j": 1}},
    }
    assert decode(encode(message)) == message


def test_encode_uses_bin_for_bytes_and_str_for_text() -> None:
    assert encode({"a": b"x"}) == b"\x81\xa1a\xc4\x01x"
    assert encode({"a": "x"}) == b"\x81\xa1a\xa1x"


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "not a msgpack message"),
        (b"\xc1", "not a msgpack message: FormatError"),  # a byte msgpack never uses
        (b"\x92\x01", "incomplete input"),  # truncated array
        (b"\x01\x02", "ExtraData"),  # two messages in one frame
        (b"garbage!", "not a msgpack message"),
        (b"\x81\xa1a\xa2\xff\xfe", "UnicodeDecodeError"),  # non-UTF-8 str value
        (b"\x81\xa2\xff\xfe\x01", "UnicodeDecodeError"),  # non-UTF-8 str key
        (b"\x81\x80\x01", "dict is not allowed for map key"),
        (b"\x81\x91\x01\x02", "list is not allowed for map key"),
        (b"\x81\x01\x02", "int is not allowed for map key"),
        (b"\x81\xa1a\xd4\x01\x00", "exceeds max_ext_len"),  # ext type 1
        (b"\x81\xa1a\xd6\xff\x00\x00\x00\x00", "exceeds max_ext_len"),  # timestamp ext
        (b"\x91" * 5000 + b"\x00", "StackError"),  # nesting too deep
    ],
)
def test_decode_rejects_malformed_frames(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(frame)


@pytest.mark.parametrize(
    ("value", "kind"),
    [([1, 2], "list"), (7, "int"), ("hello", "str"), (None, "NoneType"), (b"x", "bytes"), (True, "bool")],
)
def test_decode_rejects_messages_that_are_not_maps(value: object, kind: str) -> None:
    with pytest.raises(ProtocolError, match=f"a message must be a map, not {kind}"):
        decode(msgpack.packb(value))


def padded(size: int) -> bytes:
    """A valid message frame of exactly ``size`` bytes (every string under the 4096 limit)."""
    message: dict[str, object] = {"v": 1, "op": "hello"}
    while size - len(encode(message)) > 4000:
        message[f"p{len(message)}"] = "x" * 3000
    for n in range(4000):
        message["last"] = "x" * n
        frame = encode(message)
        if len(frame) == size:
            return frame
    raise AssertionError(f"cannot pad a message to {size} bytes")


def test_decode_accepts_a_frame_of_exactly_max_message() -> None:
    assert decode(padded(MAX_MESSAGE))["op"] == "hello"


def test_decode_rejects_a_frame_over_max_message() -> None:
    with pytest.raises(ProtocolError, match=f"message of {MAX_MESSAGE + 1} bytes exceeds {MAX_MESSAGE}"):
        decode(padded(MAX_MESSAGE + 1))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x" * 4097, "exceeds max_str_len"),
        (b"x" * 4097, "exceeds max_bin_len"),
        (list(range(4097)), "exceeds max_array_len"),
        ({f"k{i}": i for i in range(65)}, "exceeds max_map_len"),
    ],
)
def test_decode_bounds_every_container(value: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(encode({"v": 1, "x": value}))


def test_replies_may_be_larger_than_requests() -> None:
    frame = encode({"v": 1, "ok": True, "zones": ["z" * 5000] * 20})  # over MAX_MESSAGE and max_str_len
    assert len(frame) > MAX_MESSAGE
    with pytest.raises(ProtocolError):
        decode(frame)
    assert decode(frame, MAX_REPLY)["zones"][19] == "z" * 5000
    with pytest.raises(ProtocolError, match=f"message of {MAX_REPLY + 1} bytes exceeds {MAX_REPLY}"):
        decode(b"\x00" * (MAX_REPLY + 1), MAX_REPLY)
    with pytest.raises(ProtocolError, match="exceeds max_ext_len"):
        decode(b"\x81\xa1a\xd4\x01\x00", MAX_REPLY)


@pytest.mark.parametrize(
    "message",
    [
        {"v": 1, "op": "x" * 100_000},
        {"v": "9" * 100_000, "op": "hello"},
        {"v": 1, "op": [[[[[["deep"]]]]]] * 1000},
        {"v": 1, "op": "hello", **{"k" * 1000 + str(i): i for i in range(60)}},
    ],
    ids=["long op", "long version", "deep op", "many long keys"],
)
def test_error_messages_quote_requests_briefly(message: dict[str, object]) -> None:
    with pytest.raises((ProtocolError, InvalidArgument)) as info:
        parse_request(message)
    assert len(info.value.message) < 600


def test_random_frames_raise_only_protocol_errors() -> None:
    rng = random.Random(20240601)
    kinds: set[str] = set()
    for _ in range(20000):
        frame = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        if rng.random() < 0.5:
            frame = bytes([0x80 | rng.randrange(1, 5)]) + frame  # make most of them start like a map
        try:
            message = decode(frame)
        except ProtocolError:
            kinds.add("protocol")
            continue
        kinds.add("map")
        assert isinstance(message, dict)
        try:
            parse_request(message)
        except (ProtocolError, InvalidArgument):
            pass
    assert kinds == {"protocol", "map"}


# -- parse_request: the message and its arguments ------------------------------------


def request(op: str = "reserve", **args: object) -> dict[str, object]:
    return {"v": VERSION, "op": op, **args}


def test_parse_reserve() -> None:
    assert parse_request(request(name="a", size=4096)) == ("reserve", {"name": "a", "size": 4096})
    assert parse_request(request(name="a", size=4096, align=2, id=7)) == (
        "reserve", {"name": "a", "size": 4096, "align": 64})
    assert parse_request(request(name="a", size=1, align=None)) == ("reserve", {"name": "a", "size": 1, "align": 64})


@pytest.mark.parametrize("op", ["hello", "snapshot", "status", "zones"])
def test_parse_commands_without_arguments(op: str) -> None:
    assert parse_request(request(op)) == (op, {})


@pytest.mark.parametrize("op", ["lookup", "free"])
def test_parse_commands_with_a_name(op: str) -> None:
    assert parse_request(request(op, name="zone")) == (op, {"name": "zone"})


def test_the_command_set() -> None:
    assert sorted(COMMANDS) == ["free", "grow", "hello", "lookup", "reserve", "snapshot", "status", "zones"]


@pytest.mark.parametrize(
    ("message", "text"),
    [
        ({"op": "hello"}, "protocol version None is not supported"),
        ({"v": 2, "op": "hello"}, "protocol version 2 is not supported; this primary speaks 1"),
        ({"v": "1", "op": "hello"}, "protocol version '1' is not supported"),
        ({"v": 0, "op": "hello"}, "protocol version 0"),
    ],
)
def test_parse_rejects_other_versions(message: dict[str, object], text: str) -> None:
    with pytest.raises(ProtocolError, match=text):
        parse_request(message)


@pytest.mark.parametrize("version", [True, 1.0])
def test_parse_rejects_versions_that_only_compare_equal_to_1(version: object) -> None:
    with pytest.raises(ProtocolError, match="protocol version"):
        parse_request({"v": version, "op": "hello"})


@pytest.mark.parametrize(
    ("op", "text"),
    [
        ("explode", "unknown operation 'explode'; known: free, grow, hello, lookup, reserve, snapshot, status, zones"),
        ("", "unknown operation ''"),
        ("Hello", "unknown operation 'Hello'"),
        (1, "unknown operation 1"),
        (None, "unknown operation None"),
        (["reserve"], r"unknown operation \['reserve'\]"),  # unhashable: must not be a TypeError
        (b"hello", "unknown operation b'hello'"),
    ],
)
def test_parse_rejects_unknown_operations(op: object, text: str) -> None:
    with pytest.raises(ProtocolError, match=text):
        parse_request({"v": VERSION, "op": op})


def test_parse_rejects_a_missing_operation() -> None:
    with pytest.raises(ProtocolError, match="unknown operation None"):
        parse_request({"v": VERSION})


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ({"name": "a"}, "reserve: missing argument 'size'"),
        ({"size": 4096}, "reserve: missing argument 'name'"),
        ({"name": "a", "size": 1, "color": "red"}, r"reserve: unknown argument\(s\) \['color'\]"),
        ({"name": "a", "size": 1, "b": 1, "a": 2}, r"unknown argument\(s\) \['a', 'b'\]"),
        ({"name": 5, "size": 1}, "zone name must be str, not int"),
        ({"name": "", "size": 1}, "got 0 bytes"),
        ({"name": "a", "size": "4096"}, "size must be int, not str"),
        ({"name": "a", "size": True}, "size must be int, not bool"),
        ({"name": "a", "size": 0}, "got 0"),
        ({"name": "a", "size": 1.5}, "not float"),
        ({"name": "a", "size": 1, "align": 3}, "align must be a power of two"),
        ({"name": "a", "size": 1, "align": "64"}, "align must be int or None, not str"),
    ],
)
def test_parse_rejects_bad_arguments_as_invalid_argument(args: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidArgument, match=text) as info:
        parse_request(request("reserve", **args))
    assert info.value.code == 2


def test_parse_rejects_arguments_to_commands_that_take_none() -> None:
    with pytest.raises(InvalidArgument, match=r"hello: unknown argument\(s\) \['name'\]"):
        parse_request(request("hello", name="a"))


def test_parse_rejects_unknown_bytes_keys_next_to_str_keys_as_invalid_argument() -> None:
    # bin keys pass strict_map_key; sorting them with str keys must not be a TypeError
    message = decode(encode({"v": 1, "op": "hello", b"raw": 1, "text": 2}))
    with pytest.raises(InvalidArgument, match=r"hello: unknown argument\(s\) .*raw.*text"):
        parse_request(message)


def test_parse_names_a_lone_unknown_bytes_key() -> None:
    message = decode(encode({"v": 1, "op": "hello", b"raw": 1}))
    with pytest.raises(InvalidArgument, match=r"unknown argument\(s\) .*raw"):
        parse_request(message)


# -- replies ------------------------------------------------------------------------


def test_ok_reply() -> None:
    assert ok_reply({"generation": 3}) == {"v": 1, "ok": True, "generation": 3}
    assert ok_reply({"generation": 3}, 17) == {"v": 1, "ok": True, "generation": 3, "id": 17}


def test_error_reply() -> None:
    err = AlreadyExists("a zone named 'a' already exists", name="a")
    assert error_reply(err, "req-1") == {
        "v": 1, "ok": False, "code": 3, "error": "AlreadyExists",
        "message": "a zone named 'a' already exists", "fields": {"name": "a"}, "id": "req-1",
    }


@pytest.mark.parametrize("request_id", [0, 7, -1, 2**63, "abc", ""])
def test_id_is_echoed_for_int_and_str(request_id: object) -> None:
    assert ok_reply({}, request_id)["id"] == request_id
    assert error_reply(NotFound("x"), request_id)["id"] == request_id


@pytest.mark.parametrize("request_id", [None, True, False, 1.5, [1], {"a": 1}, b"id"])
def test_id_is_not_echoed_for_other_types(request_id: object) -> None:
    assert "id" not in ok_reply({}, request_id)
    assert "id" not in error_reply(NotFound("x"), request_id)


def test_result_of_an_ok_reply_returns_it() -> None:
    reply = {"v": 1, "ok": True, "zones": []}
    assert result_of(reply) is reply


def test_result_of_raises_the_class_of_the_code() -> None:
    with pytest.raises(AlreadyExists, match="^taken$"):
        result_of({"v": 1, "ok": False, "code": 3, "error": "AlreadyExists", "message": "taken"})


@pytest.mark.parametrize(
    "reply",
    [
        {"ok": False, "code": 99, "message": "m"},
        {"ok": False, "code": "3", "message": "m"},
        {"ok": False, "code": None, "message": "m"},
        {"ok": False, "message": "m"},
        {"ok": 1, "code": 99, "message": "m"},  # only True means ok
    ],
)
def test_result_of_unknown_codes_raise_the_root_class(reply: dict[str, object]) -> None:
    with pytest.raises(HugeshmdError, match="^m$") as info:
        result_of(reply)
    assert type(info.value) is HugeshmdError


def test_result_of_without_message() -> None:
    with pytest.raises(NotFound, match="error without message"):
        result_of({"ok": False, "code": 4})


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_survives_the_wire(cls: type[HugeshmdError]) -> None:
    reply = decode(encode(error_reply(cls("it broke"), 5)))
    assert reply["error"] == cls.__name__
    assert reply["id"] == 5
    with pytest.raises(cls, match="^it broke$") as info:
        result_of(reply)
    assert type(info.value) is cls


def test_declared_fields_cross_the_wire() -> None:
    sent = AddressUnavailable("taken", address=0x1000, size=4096, errno=17, conflicts=["1000-2000 rw-p x"])
    with pytest.raises(AddressUnavailable) as info:
        result_of(decode(encode(error_reply(sent))))
    assert info.value.fields == sent.fields
    busy = TableFull("full", table="zones", capacity=3)
    with pytest.raises(TableFull) as full:
        result_of(decode(encode(error_reply(busy))))
    assert (full.value.table, full.value.capacity, full.value.size) == ("zones", 3, None)


def test_undeclared_fields_from_a_newer_primary_are_dropped() -> None:
    reply = decode(encode(error_reply(NotFound("gone", name="a"))))
    reply["fields"]["added_later"] = 1
    with pytest.raises(NotFound) as info:
        result_of(reply)
    assert info.value.fields == {"name": "a"}


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_declared_field_is_present_and_survives_pickling(cls: type[HugeshmdError]) -> None:
    empty = cls("no fields given")
    assert set(empty.fields) == set(cls.FIELDS)  # present, None (or [] for conflicts) when not known
    given = {name: f"v-{name}" for name in cls.FIELDS}
    copy = pickle.loads(pickle.dumps(cls("with fields", **given)))
    assert type(copy) is cls and copy.message == "with fields" and copy.fields == given


def test_an_undeclared_field_is_a_mistake_of_the_raiser() -> None:
    with pytest.raises(TypeError, match="NotFound has no field"):
        NotFound("x", nmae="typo")


def test_new_names_are_subclasses_of_what_was_raised_before() -> None:
    assert issubclass(TableFull, OutOfMemory)
    assert issubclass(PrimaryStopped, PrimaryUnavailable)
    assert issubclass(HandleClosed, HugeshmdError)
    assert AddressUnavailable("x").conflicts == []


def test_every_error_is_exported_by_the_package() -> None:
    import hugeshmd

    for cls in ALL_ERRORS:
        assert getattr(hugeshmd, cls.__name__) is cls


# -- the error hierarchy ----------------------------------------------------------------


def test_error_codes_are_unique_and_map_back() -> None:
    codes = [cls.code for cls in ALL_ERRORS]
    assert len(set(codes)) == len(codes) == 22
    for cls in ALL_ERRORS:
        assert error_for_code(cls.code) is cls
        assert issubclass(cls, HugeshmdError)
    assert error_for_code(0) is HugeshmdError
    assert error_for_code(12345) is HugeshmdError


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [(InvalidArgument, ValueError), (NotFound, LookupError), (OutOfMemory, MemoryError),
     (PrimaryUnavailable, ConnectionError), (TableBusy, BlockingIOError)],
)
def test_errors_also_inherit_the_matching_builtin(cls: type[HugeshmdError], builtin: type) -> None:
    assert issubclass(cls, builtin)


def test_errors_carry_their_fields() -> None:
    err = OutOfMemory("no room", name="z", size=4096)
    assert (err.message, err.name, err.size, str(err)) == ("no room", "z", 4096, "no room")
