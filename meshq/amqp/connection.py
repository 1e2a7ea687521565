"""The server side of one AMQP 0-9-1 connection as a sans-IO state machine (h11's shape).

Feed it the bytes a client sent (``receive_data``); it answers the connection's own
negotiation itself (start, tune, open, channel open/close, close, heartbeats are the
driver's to time) and returns events for the rest: methods on open channels, and
publishes assembled from their method, header and body frames. ``data_to_send`` hands
over what is to be written. State here: the negotiation's progress, the tuned limits,
the open channels and each one's publish being assembled. Never: an event for a channel
that is not open, a method before the connection is open, or a protocol error that does
not close the connection with the reply code the spec gives it (403, 501-505, 530).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from pamqp import body as pbody
from pamqp import commands as spec
from pamqp import decode as pdecode
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat
from pamqp.base import Frame as PFrame

from meshq.amqp.frames import (
    FRAME_ERROR,
    MIN_FRAME_MAX,
    PROTOCOL_HEADER,
    AmqpError,
    ContentHeader,
    FrameReader,
    basic_ack,
    content_header,
    deliver,
    marshal,
)

__all__ = [
    "ACCESS_REFUSED",
    "CHANNEL_ERROR",
    "COMMAND_INVALID",
    "NOT_ALLOWED",
    "UNEXPECTED_FRAME",
    "AmqpConnection",
    "ChannelClosed",
    "ChannelOpened",
    "ConnectionClosed",
    "Event",
    "MethodReceived",
    "Opened",
    "Published",
    "State",
    "Tuning",
]

ACCESS_REFUSED = 403
NOT_ALLOWED = 530
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
UNEXPECTED_FRAME = 505
REPLY_SUCCESS = 200
PRECONDITION_FAILED = 406
_BODY_HEAD = struct.Struct(">BHI")


class State(enum.Enum):
    AWAIT_HEADER = "await_header"
    AWAIT_START_OK = "await_start_ok"
    AWAIT_LOGIN = "await_login"  # check_login deferred: the driver calls finish_login
    AWAIT_TUNE_OK = "await_tune_ok"
    AWAIT_OPEN = "await_open"
    OPEN = "open"
    CLOSING = "closing"  # we sent Connection.Close: only Close-Ok (or Close) counts now
    CLOSED = "closed"


@dataclass(frozen=True)
class Tuning:
    """What this server offers in Connection.Tune (0: no limit / no heartbeat)."""

    channel_max: int = 2047
    frame_max: int = 131072
    heartbeat: int = 60


@dataclass(frozen=True)
class Opened:
    user: str
    vhost: str
    client_properties: dict[str, Any]


@dataclass(frozen=True)
class ChannelOpened:
    channel: int


@dataclass(frozen=True)
class ChannelClosed:
    """The client closed the channel (or confirmed our close of it)."""

    channel: int


@dataclass(slots=True)
class MethodReceived:
    channel: int
    method: PFrame


@dataclass(slots=True)
class Published:
    """A whole publish: ``raw_properties`` as the client encoded them, and of them its
    ``headers`` table and ``expiration``; ``properties`` decodes them all (on demand)."""

    channel: int
    method: spec.Basic.Publish
    body: bytes
    raw_properties: bytes = b"\x00\x00"
    headers: dict[str, Any] | None = None
    expiration: str | None = None

    @property
    def properties(self) -> spec.Basic.Properties:
        head = pheader.ContentHeader()
        head.unmarshal(b"\x00\x3c\x00\x00" + bytes(8) + self.raw_properties)
        return head.properties


@dataclass(frozen=True)
class ConnectionClosed:
    """The connection is over: closed by the client (``by_peer``), or by us for
    ``code``/``text`` (once the client confirmed, or at once if it broke the framing)."""

    code: int
    text: str
    by_peer: bool


Event: TypeAlias = (Opened | ChannelOpened | ChannelClosed | MethodReceived | Published
                    | ConnectionClosed)


@dataclass
class _Assembly:
    method: spec.Basic.Publish
    header: ContentHeader | None = None
    parts: list[bytes] = field(default_factory=list)
    got: int = 0


class AmqpConnection:
    """``check_login(user, password)`` decides a login (PLAIN or AMQPLAIN): True, False,
    or None to leave it to the driver (``pending_login``, then ``finish_login``);
    ``server_properties`` go in Connection.Start; a publish whose content header announces
    a body over ``max_body`` closes its channel (406) before any of the body is kept."""

    def __init__(self, check_login: Callable[[str, str], bool | None], *,
                 tuning: Tuning = Tuning(), server_properties: dict[str, Any] | None = None,
                 max_body: int | None = None) -> None:
        self.check_login = check_login
        self.max_body = max_body
        self.pending_login: tuple[str, str] | None = None  # (user, password) to decide
        self.offer = tuning
        self.server_properties = server_properties or {}
        self.state = State.AWAIT_HEADER
        self.channel_max = tuning.channel_max
        self.frame_max = tuning.frame_max
        self.heartbeat = tuning.heartbeat
        self.user = ""
        self.client_properties: dict[str, Any] = {}
        self.channels: set[int] = set()
        self.closing_channels: set[int] = set()  # we sent Channel.Close, await Close-Ok
        self._reader = FrameReader(max(tuning.frame_max, MIN_FRAME_MAX))
        self._out = bytearray()
        self._publishing: dict[int, _Assembly] = {}

    # -- output ------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        data, self._out = bytes(self._out), bytearray()
        return data

    def send_method(self, channel: int, method: PFrame) -> None:
        self._out += marshal(method, channel)

    def send_content(self, channel: int, method: PFrame,
                     properties: spec.Basic.Properties | bytes, body: bytes) -> None:
        """A method with content (basic.deliver, basic.return, basic.get-ok), its body cut
        to the negotiated frame_max; ``properties`` may come encoded already."""
        self._out += marshal(method, channel)
        if isinstance(properties, bytes):
            self._out += content_header(channel, len(body), properties)
        else:
            self._out += marshal(pheader.ContentHeader(0, len(body), properties), channel)
        chunk = max(1, self.frame_max - 8)
        for start in range(0, len(body), chunk):
            self._out += marshal(pbody.ContentBody(body[start:start + chunk]), channel)

    def send_delivery(self, channel: int, consumer_tag: str, delivery_tag: int,
                      redelivered: bool, exchange: str, routing_key: str,
                      properties: bytes, body: bytes) -> None:
        """basic.deliver with its content (``send_content``'s hot path)."""
        out = self._out
        out += deliver(channel, consumer_tag, delivery_tag, redelivered, exchange, routing_key)
        out += content_header(channel, len(body), properties)
        chunk = max(1, self.frame_max - 8)
        if len(body) <= chunk:
            out += _BODY_HEAD.pack(3, channel, len(body))
            out += body
            out += b"\xce"
            return
        for start in range(0, len(body), chunk):
            out += marshal(pbody.ContentBody(body[start:start + chunk]), channel)

    def send_confirm(self, channel: int, delivery_tag: int, multiple: bool) -> None:
        """A publisher confirm (basic.ack), written directly."""
        self._out += basic_ack(channel, delivery_tag, multiple)

    def send_heartbeat(self) -> None:
        self._out += marshal(pheartbeat.Heartbeat(), 0)

    def close_channel(self, channel: int, code: int, text: str, class_id: int = 0,
                      method_id: int = 0) -> None:
        """A channel exception: Channel.Close; the channel takes nothing more until the
        client's Close-Ok (which ends it with ChannelClosed)."""
        if channel not in self.channels or channel in self.closing_channels:
            return
        self.closing_channels.add(channel)
        self._publishing.pop(channel, None)
        self.send_method(channel, spec.Channel.Close(code, text[:255], class_id, method_id))

    def close(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        """Close the connection (a connection exception, or shutting down)."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        if self.state is State.AWAIT_HEADER:
            self.state = State.CLOSED
            return
        self.state = State.CLOSING
        self.send_method(0, spec.Connection.Close(code, text[:255], class_id, method_id))

    # -- input -------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Events for what ``data`` completed. A protocol error closes the connection
        (Connection.Close queued; framing errors end it at once with ConnectionClosed)."""
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        self._reader.feed(data)
        try:
            header_was_ok = self._reader.header_ok
            try:
                frames = self._reader.frames()
            finally:  # a header then garbage: Start, then the close, as a server would
                if not header_was_ok and self._reader.header_ok:
                    self._start()
            for f in frames:
                self._frame(f.channel, f.value, events)
                if self.state is State.CLOSED:
                    break
        except AmqpError as exc:
            if exc.code == FRAME_ERROR and not self._reader.header_ok:
                self._out += PROTOCOL_HEADER  # as the spec says: the version we speak
                self.state = State.CLOSED
                events.append(ConnectionClosed(exc.code, exc.text, False))
                return events
            self.close(exc.code, exc.text, exc.class_id, exc.method_id)
            if exc.code == FRAME_ERROR:  # the framing is lost: nothing more can be read
                self.state = State.CLOSED
                events.append(ConnectionClosed(exc.code, exc.text, False))
        return events

    def _start(self) -> None:
        self.state = State.AWAIT_START_OK
        self.send_method(0, spec.Connection.Start(
            server_properties=self.server_properties, mechanisms="PLAIN AMQPLAIN",
            locales="en_US"))

    def _frame(self, channel: int, value: Any, events: list[Event]) -> None:
        if isinstance(value, pheartbeat.Heartbeat):
            if channel != 0:
                raise AmqpError(FRAME_ERROR, "heartbeat on a channel other than 0")
            return
        if isinstance(value, ContentHeader | pbody.ContentBody):
            self._content(channel, value, events)
            return
        if channel in self._publishing:  # a method where content was due
            raise AmqpError(UNEXPECTED_FRAME, f"{value.name} while a publish's content was "
                            "due", *_ids(value))
        if channel == 0:
            self._connection_method(value, events)
            return
        if self.state is State.CLOSING:
            return  # after our Connection.Close, everything but Close/Close-Ok is dropped
        if self.state is not State.OPEN:
            raise AmqpError(COMMAND_INVALID, f"{value.name} before the connection is open",
                            *_ids(value))
        self._channel_method(channel, value, events)

    def _connection_method(self, m: PFrame, events: list[Event]) -> None:
        state = self.state
        if isinstance(m, spec.Connection.Close):
            self.send_method(0, spec.Connection.CloseOk())
            self.state = State.CLOSED
            events.append(ConnectionClosed(m.reply_code or REPLY_SUCCESS, m.reply_text, True))
            return
        if isinstance(m, spec.Connection.CloseOk):
            if state is not State.CLOSING:
                raise AmqpError(COMMAND_INVALID, "close-ok with no close", *_ids(m))
            self.state = State.CLOSED
            events.append(ConnectionClosed(REPLY_SUCCESS, "closed", False))
            return
        if state is State.CLOSING:
            return
        if isinstance(m, spec.Connection.StartOk) and state is State.AWAIT_START_OK:
            self._login(m)
            return
        if isinstance(m, spec.Connection.TuneOk) and state is State.AWAIT_TUNE_OK:
            self._tuned(m)
            return
        if isinstance(m, spec.Connection.Open) and state is State.AWAIT_OPEN:
            if m.virtual_host not in ("/", ""):
                raise AmqpError(NOT_ALLOWED, f"no virtual host {m.virtual_host!r} (meshq has "
                                "only '/')", *_ids(m))
            self.state = State.OPEN
            self.send_method(0, spec.Connection.OpenOk())
            events.append(Opened(self.user, m.virtual_host or "/", self.client_properties))
            return
        raise AmqpError(COMMAND_INVALID, f"unexpected {m.name} on channel 0", *_ids(m))

    def _login(self, m: spec.Connection.StartOk) -> None:
        self.client_properties = dict(m.client_properties or {})
        user, password = _credentials(m.mechanism, m.response)
        verdict = self.check_login(user, password)
        if verdict is None:  # too costly to decide here (a key derivation): later
            self.state = State.AWAIT_LOGIN
            self.pending_login = (user, password)
            return
        self.finish_login(user, verdict)

    def finish_login(self, user: str, ok: bool) -> None:
        """The login's verdict (after ``pending_login``): tune, or close with 403."""
        self.pending_login = None
        if not ok:
            self.state = State.AWAIT_START_OK  # (for close: the handshake had not ended)
            self.close(ACCESS_REFUSED, f"ACCESS_REFUSED - login refused for user {user!r}",
                       10, 11)
            return
        self.user = user
        self.state = State.AWAIT_TUNE_OK
        self.send_method(0, spec.Connection.Tune(self.offer.channel_max, self.offer.frame_max,
                                                 self.offer.heartbeat))

    def _tuned(self, m: spec.Connection.TuneOk) -> None:
        offer = self.offer
        if m.frame_max and m.frame_max < MIN_FRAME_MAX:
            raise AmqpError(NOT_ALLOWED, f"frame_max {m.frame_max} is below {MIN_FRAME_MAX}",
                            *_ids(m))
        if offer.frame_max and (m.frame_max == 0 or m.frame_max > offer.frame_max):
            raise AmqpError(NOT_ALLOWED, f"frame_max {m.frame_max} is above the "
                            f"{offer.frame_max} offered", *_ids(m))
        if offer.channel_max and (m.channel_max == 0 or m.channel_max > offer.channel_max):
            raise AmqpError(NOT_ALLOWED, f"channel_max {m.channel_max} is above the "
                            f"{offer.channel_max} offered", *_ids(m))
        self.frame_max = m.frame_max or offer.frame_max
        self.channel_max = m.channel_max or offer.channel_max
        self.heartbeat = m.heartbeat
        self._reader.frame_max = max(self.frame_max, MIN_FRAME_MAX)
        self.state = State.AWAIT_OPEN

    def _channel_method(self, channel: int, m: PFrame, events: list[Event]) -> None:
        if isinstance(m, spec.Channel.Open):
            if channel in self.channels:
                raise AmqpError(CHANNEL_ERROR, f"channel {channel} is already open", *_ids(m))
            if self.channel_max and channel > self.channel_max:
                raise AmqpError(CHANNEL_ERROR, f"channel {channel} is above channel_max "
                                f"{self.channel_max}", *_ids(m))
            self.channels.add(channel)
            self.send_method(channel, spec.Channel.OpenOk())
            events.append(ChannelOpened(channel))
            return
        if channel not in self.channels:
            raise AmqpError(CHANNEL_ERROR, f"channel {channel} is not open", *_ids(m))
        if isinstance(m, spec.Channel.Close):
            self._forget(channel)
            self.send_method(channel, spec.Channel.CloseOk())
            events.append(ChannelClosed(channel))
            return
        if isinstance(m, spec.Channel.CloseOk):
            if channel in self.closing_channels:
                self._forget(channel)
                events.append(ChannelClosed(channel))
            return
        if channel in self.closing_channels:
            return  # after our Channel.Close, the channel's other frames are dropped
        if isinstance(m, spec.Basic.Publish):
            self._publishing[channel] = _Assembly(m)
            return
        events.append(MethodReceived(channel, m))

    def _content(self, channel: int, value: ContentHeader | pbody.ContentBody,
                 events: list[Event]) -> None:
        if channel in self.closing_channels:
            return
        a = self._publishing.get(channel)
        if a is None:
            raise AmqpError(UNEXPECTED_FRAME, "content with no publish before it")
        if isinstance(value, ContentHeader):
            if a.header is not None:
                raise AmqpError(UNEXPECTED_FRAME, "a second content header")
            if self.max_body is not None and value.body_size > self.max_body:
                self.close_channel(channel, PRECONDITION_FAILED, f"PRECONDITION_FAILED - "
                                   f"message size {value.body_size} is larger than "
                                   f"configured max size {self.max_body}", 60, 40)
                return
            a.header = value
        else:
            if a.header is None:
                raise AmqpError(UNEXPECTED_FRAME, "a content body before its header")
            a.parts.append(value.value)
            a.got += len(value.value)
            if a.got > a.header.body_size:
                raise AmqpError(FRAME_ERROR, f"content bodies of {a.got} bytes for a body "
                                f"of {a.header.body_size}")
        h = a.header
        if h is not None and a.got == h.body_size:
            del self._publishing[channel]
            events.append(Published(channel, a.method, b"".join(a.parts), h.raw_properties,
                                    h.headers, h.expiration))

    def _forget(self, channel: int) -> None:
        self.channels.discard(channel)
        self.closing_channels.discard(channel)
        self._publishing.pop(channel, None)


def _ids(m: PFrame) -> tuple[int, int]:
    index = getattr(m, "index", 0) or 0
    return index >> 16, index & 0xFFFF


def _credentials(mechanism: str, response: Any) -> tuple[str, str]:
    """(user, password) from a PLAIN (``\\0user\\0password``) or AMQPLAIN (a field table
    with LOGIN and PASSWORD) response."""
    raw = response.encode("latin-1") if isinstance(response, str) else bytes(response or b"")
    if mechanism == "PLAIN":
        parts = raw.split(b"\0")
        if len(parts) != 3:
            raise AmqpError(ACCESS_REFUSED, "ACCESS_REFUSED - malformed PLAIN response")
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
    if mechanism == "AMQPLAIN":
        try:
            _, table = pdecode.field_table(len(raw).to_bytes(4, "big") + raw)
        except Exception:  # a peer's bytes: any failure is a refusal
            raise AmqpError(ACCESS_REFUSED, "ACCESS_REFUSED - malformed AMQPLAIN response"
                            ) from None
        return str(table.get("LOGIN", "")), str(table.get("PASSWORD", ""))
    raise AmqpError(ACCESS_REFUSED, f"ACCESS_REFUSED - unknown mechanism {mechanism!r}")
