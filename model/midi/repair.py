"""Tolerant Standard MIDI File reader, used when a strict ``mido`` read fails.

Only the container framing is parsed by hand: chunk headers, variable-length delta times,
status and running status, and the lengths of meta and sysex events. Every message is built
by ``mido`` itself (``mido.Message.from_bytes``, ``build_meta_message``, ``mido.Message('sysex')``),
so a recovered message means exactly what ``mido`` would make of the same bytes.

Recovery rules (each use is counted in :class:`RepairReport`; track numbers are indices into
the returned ``MidiFile.tracks``):

* **Track ends.** A track is read event by event up to its End-of-Track, not up to its declared
  chunk length: real files carry lengths that are too long (swallowing the next track's header)
  or too short. The next chunk is looked for right after End-of-Track; events that sit between
  End-of-Track and a consistent declared end are kept, as ``mido`` keeps them.
* **Text meta events that are too long.** Some files declare a text length a few bytes longer than
  the text, so the delta time and status byte of the next event are swallowed and the next event
  starts with a bare data byte. When the bytes after a text meta event do not parse, the text is
  cut back to its printable part if the cut-off bytes then parse cleanly as events.
* **Missing status with no running status.** Tried in order of how well the following events
  parse: a missing delta time (the byte read as a delta is really a status byte), then a status
  inferred from the next status byte in the stream (a note stream on that channel needs
  ``note_on``), and finally skipping bytes to the next point where events parse cleanly.
* **Data bytes over 127** are clipped to 127, as ``mido`` does with ``clip=True``.
* **Undefined status bytes** (F4, F5, F9, FD) are dropped; their delta time goes to the next event.
  Other unreadable bytes (e.g. a delta time over four bytes) are skipped up to the next point where
  events parse cleanly.
* **Truncated tracks** (declared length past the end of the file) are read up to the end of the
  file; a partial last event is dropped and notes left sounding are left for the caller to close.
  No End-of-Track is invented.
* **Missing or damaged track headers.** Where a chunk header should be but is not, events are
  parsed from there as a track without a header if they parse cleanly; otherwise bytes are
  skipped up to the next ``MTrk`` or the next point where events parse cleanly. A chunk with
  another id is read as a track if it holds track events (a damaged ``MTrk`` id), and skipped
  whole otherwise.

"Parses cleanly" means: the next :data:`MIN_CLEAN_EVENTS` events (or all events up to End-of-Track)
frame without any fault a strict ``mido`` read would raise. A file that a strict ``mido`` read
accepts triggers no repair and gives the same tracks as ``mido.MidiFile(file=...)``, except that
track chunks beyond the header's track count, which mido ignores, are read here too.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

import mido
from mido.midifiles.meta import KeySignatureError, UnknownMetaMessage, build_meta_message, meta_charset

from model.midi.limits import Deadline, ReadLimits

logger = logging.getLogger(__name__)

HEADER_ID = b"MThd"
TRACK_ID = b"MTrk"
CHUNK_HEADER_SIZE = 8
HEADER_DATA_SIZE = 6
META_STATUS = 0xFF
END_OF_TRACK = 0x2F
SYSEX_STATUSES = (0xF0, 0xF7)
MAX_VLQ_BYTES = 4
#: How many events ahead a candidate reading is checked; reaching End-of-Track counts as all.
LOOKAHEAD_EVENTS = 32
#: A reading is trusted after a fault only if this many events (or End-of-Track) parse cleanly.
MIN_CLEAN_EVENTS = 8
#: At most this many trailing bytes of a text meta event are tried as the start of the next event.
MAX_TEXT_OVERRUN = 8
#: How far ahead a status byte is looked for to infer the channel of a missing status.
STATUS_SEARCH_BYTES = 64

_CHANNEL_DATA_LENGTH = {0x80: 2, 0x90: 2, 0xA0: 2, 0xB0: 2, 0xC0: 1, 0xD0: 1, 0xE0: 2}
# System common and real-time messages mido reads inside tracks (F4, F5, F9, FD are undefined).
_SYSTEM_DATA_LENGTH = {0xF1: 1, 0xF2: 2, 0xF3: 1, 0xF6: 0, 0xF8: 0, 0xFA: 0, 0xFB: 0, 0xFC: 0, 0xFE: 0}
# Inferred statuses for a channel, most likely first: a note stream needs note_on.
_INFERRED_KINDS = (0x90, 0x80, 0xB0, 0xC0, 0xE0, 0xD0, 0xA0)
_TEXT_META_TYPES = range(0x01, 0x10)


class MidiRepairError(ValueError):
    """Nothing usable could be read from the data; the message says why."""


@dataclass
class RepairReport:
    """What :func:`read_tolerant` had to change or leave out.

    ``problems`` has one line per kind of problem, with counts and (0-based) track numbers.
    ``dropped_events`` counts events that could not be recovered (a stretch of skipped bytes
    counts as one); ``dropped_bytes`` counts bytes of the file that were not used.
    """

    problems: list[str] = field(default_factory=list)
    dropped_events: int = 0
    dropped_bytes: int = 0


class _Fault(Exception):
    """The bytes at ``pos`` cannot be framed as an event; ``kind`` says why."""

    def __init__(self, kind: str, pos: int) -> None:
        super().__init__(f"{kind} at byte {pos}")
        self.kind = kind  # "eof", "no_status", "bad_status", "long_vlq" or "over_127"
        self.pos = pos


@dataclass(frozen=True, slots=True)
class _Event:
    """One framed event: where it lies, its delta time, status and payload."""

    start: int
    end: int
    delta: int
    status: int
    payload: bytes  # data bytes (clipped) / meta data / sysex data (stripped, clipped)
    meta_type: int | None = None
    clipped: int = 0


@dataclass(slots=True)
class _Log:
    """Collects problems as counts per (track, kind) plus one-off notes, in order of arrival, and
    enforces the reading limits (time, tracks, events) as the reader goes."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # a count of 0 marks a note
    dropped_events: int = 0
    dropped_bytes: int = 0
    limits: ReadLimits = field(default_factory=ReadLimits)
    deadline: Deadline | None = None
    events: int = 0

    def check_time(self) -> None:
        if self.deadline is not None and self.deadline.passed():
            raise MidiRepairError(f"reading took longer than {self.deadline.seconds:g} s (the limit, seconds)")

    def add_event(self) -> None:
        self.events += 1
        if self.events > self.limits.max_events:
            raise MidiRepairError(f"more than {self.limits.max_events:,} events (the limit, max_events)")

    def count(self, where: str, what: str, n: int = 1) -> None:
        """Add ``n`` to a counted problem; ``what`` has ``{s}`` where a plural ending goes."""
        logger.debug("%s: %d %s", where, n, what.format(s="(s)"))
        self.counts[(where, what)] = self.counts.get((where, what), 0) + n

    def note(self, where: str, text: str) -> None:
        logger.debug("%s: %s", where, text)
        self.counts.setdefault((where, text), 0)

    def drop(self, events: int, nbytes: int) -> None:
        self.dropped_events += events
        self.dropped_bytes += nbytes

    def report(self) -> RepairReport:
        lines = [f"{where}: {n} {what.format(s='' if n == 1 else 's')}" if n else f"{where}: {what}"
                 for (where, what), n in self.counts.items()]
        return RepairReport(lines, self.dropped_events, self.dropped_bytes)


# --------------------------------------------------------------------------- framing


def _read_vlq(data: bytes, pos: int) -> tuple[int, int]:
    """Read a variable-length quantity; return (value, position after it)."""
    value = 0
    for offset in range(MAX_VLQ_BYTES):
        if pos + offset >= len(data):
            raise _Fault("eof", pos)
        byte = data[pos + offset]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + offset + 1
    raise _Fault("long_vlq", pos)


def _take(data: bytes, pos: int, size: int, event_start: int) -> bytes:
    if pos + size > len(data):
        raise _Fault("eof", event_start)
    return data[pos:pos + size]


def _clip(payload: bytes, event_start: int, clip: bool) -> tuple[bytes, int]:
    """Clip bytes over 127 to 127 (mido's ``clip=True``) or fault when not clipping."""
    over = sum(1 for byte in payload if byte > 127)
    if over and not clip:
        raise _Fault("over_127", event_start)
    return (bytes(min(byte, 127) for byte in payload) if over else payload), over


def _scan_event(data: bytes, pos: int, running: int | None, *, clip: bool,
                delta: int | None = None) -> _Event:
    """Frame the event at ``pos``. With ``delta`` given, ``pos`` is at the status byte."""
    start = pos
    if delta is None:
        delta, pos = _read_vlq(data, pos)
    if pos >= len(data):
        raise _Fault("eof", start)
    status = data[pos]
    if status < 0x80:
        if running is None:
            raise _Fault("no_status", start)
        status = running
    else:
        pos += 1
    if status == META_STATUS:
        meta_type = _take(data, pos, 1, start)[0]
        length, pos = _read_vlq(data, pos + 1)
        payload = _take(data, pos, length, start)
        return _Event(start, pos + length, delta, status, payload, meta_type)
    if status in SYSEX_STATUSES:
        length, pos = _read_vlq(data, pos)
        payload, clipped = _clip(_strip_sysex(_take(data, pos, length, start)), start, clip)
        return _Event(start, pos + length, delta, status, payload, clipped=clipped)
    if status >= 0xF0:
        if status not in _SYSTEM_DATA_LENGTH:
            raise _Fault("bad_status", start)
        size = _SYSTEM_DATA_LENGTH[status]
    else:
        size = _CHANNEL_DATA_LENGTH[status & 0xF0]
    payload, clipped = _clip(_take(data, pos, size, start), start, clip)
    return _Event(start, pos + size, delta, status, payload, clipped=clipped)


def _strip_sysex(payload: bytes) -> bytes:
    """Sysex data without a leading F0 and a trailing F7, as mido's reader keeps it."""
    if payload[:1] == b"\xf0":
        payload = payload[1:]
    if payload[-1:] == b"\xf7":
        payload = payload[:-1]
    return payload


def _next_running(event: _Event, running: int | None) -> int | None:
    """Running status after ``event``: channel messages set it, meta keeps it, system clears it."""
    if event.status < 0xF0:
        return event.status
    if event.status == META_STATUS or event.status >= 0xF8:
        return running
    return None


def _is_end_of_track(event: _Event) -> bool:
    return event.status == META_STATUS and event.meta_type == END_OF_TRACK


def _clean_run(data: bytes, pos: int, running: int | None, limit: int = LOOKAHEAD_EVENTS) -> int:
    """How many events from ``pos`` frame strictly; End-of-Track or a track header scores ``limit``."""
    for count in range(limit):
        if data.startswith(TRACK_ID, pos) and count:
            return limit
        try:
            event = _scan_event(data, pos, running, clip=False)
        except _Fault:
            return count
        if _is_end_of_track(event):
            return limit
        running = _next_running(event, running)
        pos = event.end
    return limit


def _printable(text: bytes) -> bool:
    return text.decode("latin-1").isprintable()


# --------------------------------------------------------------------------- messages


def _build_message(event: _Event, where: str, log: _Log) -> mido.Message | mido.MetaMessage:
    """Turn a framed event into a mido message, the way mido's own reader does."""
    if event.meta_type is not None:
        try:
            return build_meta_message(event.meta_type, list(event.payload), event.delta)
        except (ValueError, KeyError, IndexError, KeySignatureError) as exc:
            log.count(where, f"meta event{{s}} with undecodable data kept as unknown_meta ({exc})")
            return UnknownMetaMessage(event.meta_type, list(event.payload), time=event.delta)
    if event.status in SYSEX_STATUSES:
        return mido.Message("sysex", data=list(event.payload), time=event.delta)
    return mido.Message.from_bytes([event.status, *event.payload], time=event.delta)


# --------------------------------------------------------------------------- tracks


@dataclass(slots=True)
class _TrackResult:
    track: mido.MidiTrack
    end: int  # where the next chunk is looked for


class _TrackReader:
    """Reads one track's events from ``start`` until End-of-Track, repairing what it can."""

    def __init__(self, data: bytes, start: int, declared_end: int | None, where: str, log: _Log) -> None:
        self.data = data
        self.start = start
        self.pos = start
        self.declared_end = declared_end
        self.where = where
        self.log = log
        self.running: int | None = None
        self.track = mido.MidiTrack()
        self.pending_delta = 0  # delta time of a dropped event, added to the next kept one

    def read(self) -> _TrackResult:
        while True:
            self.log.check_time()
            stop = self._stop_reason()
            if stop is not None:
                self.log.note(self.where, stop + self._sounding_text())
                return _TrackResult(self.track, self.pos)
            try:
                event = _scan_event(self.data, self.pos, self.running, clip=True)
            except _Fault as fault:
                if not self._recover(fault):
                    return _TrackResult(self.track, self.pos)
                continue
            event = self._fix_text_overrun(event)
            self._append(event)
            if _is_end_of_track(event):
                return self._finish(event.end)

    def _stop_reason(self) -> str | None:
        """Why the track ends here without End-of-Track, or None to go on reading."""
        data, pos = self.data, self.pos
        if pos == self.declared_end and (pos == len(data) or data.startswith(TRACK_ID, pos)):
            return "no End-of-Track (track ends at its declared length)"
        if pos >= len(data):
            return f"truncated: no End-of-Track before the end of the file ({self._declared_text()})"
        if data.startswith(TRACK_ID, pos):
            return f"no End-of-Track; next track header found at byte {pos} ({self._declared_text()})"
        return None

    def _declared_text(self) -> str:
        if self.declared_end is None:
            return "the track has no header"
        past = ", past the end of the file" if self.declared_end > len(self.data) else ""
        return f"declared end at byte {self.declared_end}{past}; file has {len(self.data)} bytes"

    def _sounding_text(self) -> str:
        """Notes a track left sounding when it ends early (the caller closes them)."""
        sounding: set[tuple[int, int]] = set()
        for msg in self.track:
            if msg.type == "note_on" and msg.velocity > 0:
                sounding.add((msg.channel, msg.note))
            elif msg.type in ("note_on", "note_off"):
                sounding.discard((msg.channel, msg.note))
        if not sounding:
            return ""
        return f"; {len(sounding)} note{'' if len(sounding) == 1 else 's'} left sounding"

    def _append(self, event: _Event) -> None:
        self.log.add_event()
        if event.clipped:
            self.log.count(self.where, "data byte{s} over 127 clipped to 127", event.clipped)
        if self.pending_delta:
            event = _Event(event.start, event.end, event.delta + self.pending_delta, event.status,
                           event.payload, event.meta_type, event.clipped)
            self.pending_delta = 0
        self.track.append(_build_message(event, self.where, self.log))
        self.running = _next_running(event, self.running)
        self.pos = event.end

    def _finish(self, eot_end: int) -> _TrackResult:
        """After End-of-Track: decide where the next chunk starts."""
        data, declared = self.data, self.declared_end
        if declared is None or eot_end == declared:
            return _TrackResult(self.track, eot_end)
        if eot_end < declared <= len(data) and not data.startswith(TRACK_ID, eot_end) and (
                declared == len(data) or data.startswith(TRACK_ID, declared)):
            return self._after_end_of_track(eot_end, declared)
        length = declared - self.start
        self.log.note(self.where, f"declared length {length} is wrong ({self._declared_text()}); "
                                  f"read up to End-of-Track, which ends at byte {eot_end}")
        return _TrackResult(self.track, eot_end)

    def _after_end_of_track(self, eot_end: int, declared: int) -> _TrackResult:
        """Bytes between End-of-Track and a consistent declared end: keep them if they are events."""
        pos, running, events = eot_end, self.running, []
        while pos < declared:
            try:
                event = _scan_event(self.data, pos, running, clip=False)
            except _Fault:
                break
            events.append(event)
            running, pos = _next_running(event, running), event.end
        if pos == declared:
            for event in events:
                self._append(event)
            self.log.count(self.where, "event{s} after End-of-Track kept (as mido keeps them)",
                           len(events))
        else:
            self.log.count(self.where, "byte{s} after End-of-Track skipped", declared - eot_end)
            self.log.drop(1, declared - eot_end)
        return _TrackResult(self.track, declared)

    # ----------------------------------------------------------------- repairs

    def _fix_text_overrun(self, event: _Event) -> _Event:
        """Cut a text meta event back if its last bytes are really the start of the next event."""
        if event.meta_type not in _TEXT_META_TYPES:
            return event
        as_read = _clean_run(self.data, event.end, self.running)
        if as_read >= LOOKAHEAD_EVENTS:
            return event
        best_cut, best_score = 0, max(as_read, MIN_CLEAN_EVENTS - 1)
        for cut in range(1, min(MAX_TEXT_OVERRUN, len(event.payload)) + 1):
            if not _printable(event.payload[:-cut]):
                continue
            score = _clean_run(self.data, event.end - cut, self.running)
            if score > best_score:
                best_cut, best_score = cut, score
        if not best_cut:
            return event
        self.log.count(self.where, f"text meta event{{s}} {best_cut} bytes too long "
                                   f"(trailing bytes re-read as the next event)")
        return _Event(event.start, event.end - best_cut, event.delta, event.status,
                      event.payload[:-best_cut], event.meta_type)

    def _recover(self, fault: _Fault) -> bool:
        """Handle a framing fault at the current position; False ends the track.

        Running into the end of the file is truncation only if no track header follows;
        otherwise a length (meta or sysex) is corrupt, and bytes are skipped instead.
        """
        if fault.kind == "eof" and self.data.find(TRACK_ID, self.pos + 1) < 0:
            size = len(self.data) - self.pos
            self.log.note(self.where, f"truncated: last event cut off by the end of the file "
                                      f"({size} bytes dropped; {self._declared_text()})"
                                      + self._sounding_text())
            self.log.drop(1, size)
            self.pos = len(self.data)
            return False
        if fault.kind == "no_status" and self._try_missing_status():
            return True
        if fault.kind == "bad_status":
            return self._drop_undefined_status()
        return self._skip_to_clean_events(fault.kind)

    def _drop_undefined_status(self) -> bool:
        """An undefined status byte (F4, F5, F9, FD): drop it, keeping its delta time."""
        delta, status_pos = _read_vlq(self.data, self.pos)
        status = self.data[status_pos]
        self.log.count(self.where, f"event{{s}} with undefined status byte 0x{status:02X} dropped")
        self.log.drop(1, status_pos + 1 - self.pos)
        self.pending_delta += delta
        self.pos = status_pos + 1
        return True

    def _try_missing_status(self) -> bool:
        """A data byte where a status byte is needed and no running status: try the readings."""
        data, pos = self.data, self.pos
        delta, status_pos = _read_vlq(data, pos)
        options: list[tuple[int, int, str, int | None, int]] = []  # score, rank, what, status, at
        if data[pos] >= 0x80:  # the "delta" may really be a status byte with its delta missing
            options.append((self._score_from(pos, None, 0), 0, "missing delta", None, pos))
        channel = self._channel_ahead(status_pos)
        if channel is not None:
            for rank, kind in enumerate(_INFERRED_KINDS, start=1):
                status = kind | channel
                options.append((self._score_from(status_pos, status, delta), -rank,
                                "inferred", status, status_pos))
        if not options:
            return False
        score, _, what, status, at = max(options, key=lambda o: (o[0], o[1]))
        if score < MIN_CLEAN_EVENTS:
            return False
        if what == "missing delta":
            self.log.count(self.where, "event{s} with a missing delta time (read as delta 0)")
            self._append(_scan_event(data, at, None, clip=True, delta=0))
        else:
            assert status is not None
            self.log.count(self.where, f"event{{s}} with no status byte and no running status "
                                       f"(status 0x{status:02X} inferred from the next status byte)")
            self._append(_scan_event(data, at, status, clip=True, delta=delta))
        return True

    def _score_from(self, status_pos: int, running: int | None, delta: int) -> int:
        """Clean-run score of reading an event at ``status_pos`` with the given delta and status."""
        try:
            event = _scan_event(self.data, status_pos, running, clip=False, delta=delta)
        except _Fault:
            return 0
        if _is_end_of_track(event):
            return LOOKAHEAD_EVENTS
        return _clean_run(self.data, event.end, _next_running(event, running))

    def _channel_ahead(self, pos: int) -> int | None:
        """Channel of the first channel status byte within the next few bytes."""
        for byte in self.data[pos:pos + STATUS_SEARCH_BYTES]:
            if 0x80 <= byte < 0xF0:
                return byte & 0x0F
        return None

    def _skip_to_clean_events(self, kind: str) -> bool:
        """Skip bytes until events parse cleanly again, a track header, or the end of the file."""
        data, start = self.data, self.pos
        why = kind.replace("_", " ")
        for pos in range(start + 1, len(data)):
            self.log.check_time()
            if data.startswith(TRACK_ID, pos) or _clean_run(data, pos, self.running) >= MIN_CLEAN_EVENTS:
                self.log.count(self.where, f"unreadable byte{{s}} skipped ({why})", pos - start)
                self.log.drop(1, pos - start)
                self.pos = pos
                return True
        self.log.count(self.where, f"unreadable byte{{s}} skipped up to the end of the file ({why})",
                       len(data) - start)
        self.log.drop(1, len(data) - start)
        self.pos = len(data)
        return False


# --------------------------------------------------------------------------- file


def _read_header(data: bytes, log: _Log) -> tuple[int, int, int, int]:
    """Return (format, declared track count, division, position after the header chunk)."""
    if not data:
        raise MidiRepairError("empty data: zero bytes")
    start = data.find(HEADER_ID)
    if start < 0:
        raise MidiRepairError(f"not a MIDI file: no MThd header in {len(data)} bytes "
                              f"(starts with {data[:8]!r})")
    if start:
        log.note("file", f"{start} bytes before the MThd header skipped")
        log.drop(0, start)
    fields = data[start + CHUNK_HEADER_SIZE:start + CHUNK_HEADER_SIZE + HEADER_DATA_SIZE]
    if len(fields) < HEADER_DATA_SIZE:
        raise MidiRepairError(f"MIDI header truncated: {len(data) - start} bytes from MThd, "
                              f"{CHUNK_HEADER_SIZE + HEADER_DATA_SIZE} needed")
    (size,) = struct.unpack(">L", data[start + 4:start + 8])
    fmt, ntracks, division = struct.unpack(">hhh", fields)
    if size < HEADER_DATA_SIZE:
        log.note("file", f"header chunk length {size} is less than 6; read as 6")
        size = HEADER_DATA_SIZE
    if fmt not in (0, 1, 2):
        log.note("file", f"header format {fmt} is not 0, 1 or 2; read as 1")
        fmt = 1
    return fmt, ntracks, division, start + CHUNK_HEADER_SIZE + size


def _headless_track_start(data: bytes, pos: int, log: _Log) -> int:
    """First position from ``pos`` that starts a track header or cleanly parsing events."""
    for start in range(pos, len(data)):
        log.check_time()
        if data.startswith(TRACK_ID, start) or _clean_run(data, start, None) >= MIN_CLEAN_EVENTS:
            return start
    return len(data)


def _is_foreign_chunk(data: bytes, pos: int) -> bool:
    """A well-formed chunk that is not a track (four ASCII letters and a length inside the file)."""
    chunk_id = data[pos:pos + 4]
    if pos + CHUNK_HEADER_SIZE > len(data) or not chunk_id.isalpha():
        return False
    (size,) = struct.unpack(">L", data[pos + 4:pos + 8])
    end = pos + CHUNK_HEADER_SIZE + size
    return end == len(data) or (end < len(data) and data.startswith(TRACK_ID, end))


def _read_foreign_chunk(data: bytes, pos: int, tracks: list[mido.MidiTrack], log: _Log) -> int:
    """Skip a chunk that is not ``MTrk``, unless it holds track events (a damaged track id)."""
    (size,) = struct.unpack(">L", data[pos + 4:pos + 8])
    name = data[pos:pos + 4].decode("ascii")
    start = pos + CHUNK_HEADER_SIZE
    if _clean_run(data, start, None) < MIN_CLEAN_EVENTS:
        log.note("file", f"chunk {name!r} at byte {pos} ({size} bytes) is not a track; skipped")
        log.drop(0, CHUNK_HEADER_SIZE + size)
        return start + size
    where = f"track {len(tracks)}"
    log.note(where, f"chunk id {name!r} instead of 'MTrk', but the chunk holds track events; "
                    f"read as a track")
    result = _TrackReader(data, start, start + size, where, log).read()
    tracks.append(result.track)
    return result.end


def _read_tracks(data: bytes, pos: int, log: _Log) -> list[mido.MidiTrack]:
    """Read every track chunk (or headerless run of events) from ``pos`` to the end of the data."""
    tracks: list[mido.MidiTrack] = []
    while pos < len(data):
        if len(tracks) > log.limits.max_tracks:
            raise MidiRepairError(f"more than {log.limits.max_tracks:,} tracks (the limit, max_tracks)")
        where = f"track {len(tracks)}"
        if data.startswith(TRACK_ID, pos):
            if pos + CHUNK_HEADER_SIZE > len(data):
                log.note("file", f"track header cut off by the end of the file at byte {pos}")
                log.drop(0, len(data) - pos)
                break
            (size,) = struct.unpack(">L", data[pos + 4:pos + 8])
            start = pos + CHUNK_HEADER_SIZE
            result = _TrackReader(data, start, start + size, where, log).read()
            tracks.append(result.track)
            pos = result.end
        elif _is_foreign_chunk(data, pos):
            pos = _read_foreign_chunk(data, pos, tracks, log)
        else:
            pos = _read_headless(data, pos, tracks, log)
    return tracks


def _read_headless(data: bytes, pos: int, tracks: list[mido.MidiTrack], log: _Log) -> int:
    """No track header where one should be: read events found there (or after garbage) as a track."""
    start = _headless_track_start(data, pos, log)
    if start > pos:
        where = "after the last track" if start == len(data) else f"before track {len(tracks)}"
        log.note("file", f"{start - pos} bytes of garbage at byte {pos} ({where}) skipped")
        log.drop(1, start - pos)
    if start >= len(data) or data.startswith(TRACK_ID, start):
        return start
    where = f"track {len(tracks)}"
    log.note(where, f"MTrk header missing; events read from byte {start} up to End-of-Track")
    result = _TrackReader(data, start, None, where, log).read()
    if any(msg.type != "end_of_track" for msg in result.track):
        tracks.append(result.track)
    return max(result.end, start + 1)


def read_tolerant(data: bytes, limits: ReadLimits | None = None,
                  deadline: Deadline | None = None) -> tuple[mido.MidiFile, RepairReport]:
    """Parse SMF bytes leniently into a :class:`mido.MidiFile`.

    The file's type and ticks_per_beat come from the header; its tracks hold mido messages with
    delta times, as a strict ``mido`` read would give them. For a well-formed file the result is
    the same as ``mido.MidiFile(file=...)``. What had to be repaired or left out is listed in the
    returned :class:`RepairReport` (see the module docstring for the rules). Notes left sounding
    by a truncated track are not closed here.

    Raises :class:`MidiRepairError` when nothing usable can be read: empty data, no ``MThd``
    header, a truncated header, or no track holding any event; or when the data passes one of
    ``limits`` (tracks, events) or reading passes ``deadline``.
    """
    data = bytes(data)
    log = _Log(limits=limits or ReadLimits(), deadline=deadline)
    fmt, ntracks, division, pos = _read_header(data, log)
    with meta_charset("latin1"):
        tracks = _read_tracks(data, pos, log)
    if not any(msg.type != "end_of_track" for track in tracks for msg in track):
        raise MidiRepairError(f"no track with any event could be read "
                              f"({len(tracks)} track chunks found, header declares {ntracks})")
    if len(tracks) != ntracks:
        log.note("file", f"header declares {ntracks} tracks, {len(tracks)} read")
    report = log.report()
    if report.problems:
        logger.debug("repaired MIDI data: %s", "; ".join(report.problems))
    return mido.MidiFile(type=fmt, ticks_per_beat=division, tracks=tracks), report
