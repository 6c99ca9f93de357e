"""The control protocol: msgpack maps over ZeroMQ, one reply per request.

A request is a map ``{"v": 1, "op": NAME, ...arguments, "id": optional}``; a
reply is ``{"v": 1, "ok": true, ...result}`` or ``{"v": 1, "ok": false,
"code": N, "error": CLASS, "message": TEXT}`` and echoes ``id``. Nothing is
ever unpickled, every size is bounded, and every argument of every command is
declared here with its validator, so the primary checks the frame, then the
message, then the arguments, before any handler runs.

Published changes (the ZeroMQ guide's Clone pattern) are maps with a ``seq``
counting from 1; ``snapshot`` replies carry the ``seq`` they include.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..errors import HugeshmdError, InvalidArgument, ProtocolError, error_for_code
from ..shm.zones import check_align, check_name, check_size

__all__ = ["VERSION", "MAX_MESSAGE", "MAX_REPLY", "quote", "Command", "COMMANDS", "encode", "decode", "parse_request",
           "ok_reply", "error_reply", "result_of"]

VERSION = 1
MAX_MESSAGE = 64 * 1024  # also the sockets' ZMQ_MAXMSGSIZE

MAX_REPLY = 64 << 20  # replies list every zone; a client accepts this much

# What a client sent is quoted in error replies only through this: bounded in
# depth and length, so no input can make a reply large or a repr recurse.
_quote = reprlib.Repr()
_quote.maxlevel, _quote.maxstring, _quote.maxother, _quote.maxlist, _quote.maxdict = 2, 80, 80, 4, 4


def quote(value: object) -> str:
    return _quote.repr(value)


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


# Requests are small: tighter than the frame bound unpackb applies by default.
_REQUEST_LIMITS = dict(max_str_len=4096, max_bin_len=4096, max_array_len=4096, max_map_len=64, max_ext_len=0)
_REPLY_LIMITS = dict(max_ext_len=0)


def decode(frame: bytes, max_size: int = MAX_MESSAGE) -> dict[str, Any]:
    """One msgpack map, or ProtocolError saying what is wrong with the frame.

    A request (``max_size`` MAX_MESSAGE) gets tight per-container limits; a
    reply (up to MAX_REPLY) is bounded by its size, as unpackb does by default.
    """
    if len(frame) > max_size:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds {max_size}")
    limits = _REQUEST_LIMITS if max_size <= MAX_MESSAGE else _REPLY_LIMITS
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True, **limits)
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as err:
        # UnicodeDecodeError (a ValueError) lands here for non-UTF-8 strings.
        raise ProtocolError(f"not a msgpack message: {type(err).__name__}: {err}") from err
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map, not {type(message).__name__}")
    return message


Validator = Callable[[Any], Any]


@dataclass(frozen=True)
class Command:
    """A request: its name and its arguments, each with a validator and whether required."""

    name: str
    required: dict[str, Validator] = field(default_factory=dict)
    optional: dict[str, Validator] = field(default_factory=dict)

    def arguments(self, message: dict[str, Any]) -> dict[str, Any]:
        unknown = set(message) - set(self.required) - set(self.optional) - {"v", "op", "id"}
        if unknown:
            raise InvalidArgument(f"{self.name}: unknown argument(s) {quote(sorted(map(str, unknown)))}")
        args = {}
        for key, check in self.required.items():
            if key not in message:
                raise InvalidArgument(f"{self.name}: missing argument {key!r}")
            args[key] = check(message[key])
        for key, check in self.optional.items():
            if key in message:
                args[key] = check(message[key])
        return args


COMMANDS = {
    c.name: c
    for c in (
        Command("hello"),
        Command("snapshot"),
        Command("status"),
        Command("zones"),
        Command("reserve", {"name": check_name, "size": check_size}, {"align": check_align}),
        Command("lookup", {"name": check_name}),
        Command("free", {"name": check_name}),
        Command("grow", {"size": check_size}),
    )
}


def parse_request(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(op, validated arguments); ProtocolError or InvalidArgument otherwise."""
    version = message.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"protocol version {quote(version)} is not supported; this primary speaks {VERSION}")
    op = message.get("op")
    command = COMMANDS.get(op) if isinstance(op, str) else None
    if command is None:
        raise ProtocolError(f"unknown operation {quote(op)}; known: {', '.join(sorted(COMMANDS))}")
    return command.name, command.arguments(message)


def _echo(request_id: object) -> dict[str, Any]:
    return {"id": request_id} if isinstance(request_id, (int, str)) and not isinstance(request_id, bool) else {}


def ok_reply(result: dict[str, Any], request_id: object = None) -> dict[str, Any]:
    return {"v": VERSION, "ok": True, **result, **_echo(request_id)}


_WIRE_TYPES = (type(None), bool, int, str, float)


def _wire_value(value: object) -> object:
    """A field as msgpack carries it: scalars as they are, lists of scalars, else its repr."""
    if isinstance(value, _WIRE_TYPES) and not (isinstance(value, int) and not -(1 << 63) <= value < 1 << 64):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return quote(value)


def error_reply(err: HugeshmdError, request_id: object = None) -> dict[str, Any]:
    """The reply for an error: its code, class name, message and declared fields."""
    return {"v": VERSION, "ok": False, "code": err.code, "error": type(err).__name__, "message": err.message,
            "fields": {key: _wire_value(value) for key, value in err.fields.items() if value is not None},
            **_echo(request_id)}


def result_of(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply's fields if ok; otherwise raise the exception class its code names, with
    the fields it declares (others, from a newer primary, are dropped)."""
    if reply.get("ok") is True:
        return reply
    code = reply.get("code")
    cls = error_for_code(code if isinstance(code, int) else 1)
    sent = reply.get("fields")
    fields = {k: v for k, v in sent.items() if k in cls.FIELDS} if isinstance(sent, dict) else {}
    raise cls(str(reply.get("message", "error without message")), **fields)
