"""The receiver's disk spool: accepted messages Redis could not take, kept until it can.

When the one-step publish (worker/broker/publish.py) fails (Redis down, stalled past the
enqueue's bound, or not replicated in time), the receiver appends the exact enqueue request to
this spool, fsyncs it, and only then answers 2xx; a flusher in every web process publishes the
entries again once Redis answers, oldest first (docs/spool.md). RapidPro's courier does the
same with its backend; nothing in Celery, kombu or redis-py keeps a local write-ahead file of
messages, so this is ours, kept small.

Layout, one directory per host (SPOOL_DIR):
- `<ns>-<pid>-<rand>.open`: the segment one process appends to. Only that process writes it,
  one record at a time under an exclusive `flock` (LOCK_NB: a writer never waits).
- `<same>.flushing`: a segment a flusher claimed: it took the flock on the `.open` file,
  renamed it, and holds the lock while it publishes. A writer that held the old inode sees the
  name gone (or the lock taken) and starts a new segment. A flusher that dies drops its lock
  (the kernel releases it), and any other flusher takes the segment over.
- `<same>.progress`: the flusher's progress, one 8-byte end offset appended and fsynced per
  published record. A crash resumes after the last one recorded; the one entry that may have
  been published without its offset recorded is published again, and the publish makes that
  a no-op (a marker key per entry, set in the same Lua step: REPUBLISH_ONCE).
- `<same>.kept`: records that could not be opened (sealed with a key that is not configured),
  set aside whole, in the segment format: `switchboard spool flush --kept` tries them again.
- `<same>.corrupt`: bytes that were no record at all (a damaged disk), kept for forensics.

A record: MAGIC | body length (u32) | received at (f64, epoch s) | CRC-32 of the rest of the
header and the body | body, where the body is `Sealer.seal_bytes` (AES-GCM, DATA_ENCRYPTION_KEYS)
of: JSON length (u32) | JSON {id, task, queue, args, inbox_key, post_ref} | the post bytes of an
inbound email (the post store is in Redis too, so the spool carries them). Only the time and the
sizes are in clear: no PHI on disk.

A crash while appending leaves a torn last record: it was never fsynced, so never answered 2xx;
the reader drops it (counted), never loops on it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.crypto import Sealer, Unsealable
from worker.settings import Settings

log = logging.getLogger("switchboard.spool")

MAGIC = b"SBS1"
_HEAD = struct.Struct(">4sIdI")  # magic, body length, received at, crc32
_LEN = struct.Struct(">I")
_OFFSET = struct.Struct(">Q")
OPEN, FLUSHING, PROGRESS, KEPT, CORRUPT = ".open", ".flushing", ".progress", ".kept", ".corrupt"
_SEGMENTS = (OPEN, FLUSHING)  # what the flusher publishes from
_GONE, _BUSY = "gone", "busy"  # why a segment was not claimed
# A process starts a new segment past this size, so a flush holds at most this much in memory.
SEGMENT_BYTES = 16 * 1024 * 1024


class SpoolRefused(Exception):
    """The entry was not kept (full, too large, or the disk refused): the caller answers 5xx."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Spooled:
    """One accepted message waiting for Redis: the enqueue request, exactly."""

    task: str
    queue: str
    args: list[Any]
    inbox_key: str
    post: tuple[str, bytes] | None = None  # an inbound email's post store entry (ref, bytes)
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    received_at: float = field(default_factory=time.time)


def encode(entry: Spooled, sealer: Sealer) -> bytes:
    """The record of `entry` (see the module doc)."""
    meta = json.dumps({"id": entry.id, "task": entry.task, "queue": entry.queue,
                       "args": entry.args, "inbox_key": entry.inbox_key,
                       "post_ref": entry.post[0] if entry.post else None}).encode()
    body = sealer.seal_bytes(_LEN.pack(len(meta)) + meta + (entry.post[1] if entry.post else b""))
    return _header(len(body), entry.received_at, body) + body


def _header(length: int, received_at: float, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(_HEAD.pack(MAGIC, length, received_at, 0)[:-4]))
    return _HEAD.pack(MAGIC, length, received_at, crc)


def decode(body: bytes, received_at: float, sealer: Sealer) -> Spooled:
    """The entry in a record's body; raises worker.crypto.Unsealable."""
    plain = sealer.open_bytes(body)
    (n,) = _LEN.unpack_from(plain)
    meta = json.loads(plain[_LEN.size:_LEN.size + n])
    rest = plain[_LEN.size + n:]
    post = (str(meta["post_ref"]), rest) if meta.get("post_ref") else None
    return Spooled(meta["task"], meta["queue"], list(meta["args"]), meta["inbox_key"], post,
                   meta["id"], received_at)


@dataclass(frozen=True)
class Record:
    """A whole record found in a segment: where it is, when it came, its sealed body."""

    start: int
    end: int
    received_at: float
    body: bytes


@dataclass(frozen=True)
class Damage:
    """Bytes of a segment that are no record (start, end)."""

    start: int
    end: int


@dataclass
class Scan:
    """What a segment holds from some offset on."""

    records: list[Record | Damage]
    torn: int = 0  # bytes of an unfinished last record (a crash while appending)


def _record_at(data: bytes, pos: int) -> Record | None:
    """The whole, intact record at `pos`, or None."""
    if len(data) - pos < _HEAD.size:
        return None
    magic, length, received_at, crc = _HEAD.unpack_from(data, pos)
    end = pos + _HEAD.size + length
    if magic != MAGIC or end > len(data):
        return None
    body = data[pos + _HEAD.size:end]
    if _header(length, received_at, body)[-4:] != struct.pack(">I", crc):
        return None
    return Record(pos, end, received_at, body)


def scan(data: bytes, start: int = 0) -> Scan:
    """Split segment bytes into records (pure). A bad stretch followed by an intact record is
    Damage (the reader goes on after it); a bad stretch at the end is a torn tail: a record
    whose append never finished (so never answered 2xx)."""
    out = Scan([])
    pos = start
    while pos < len(data):
        record = _record_at(data, pos)
        if record is not None:
            out.records.append(record)
            pos = record.end
            continue
        nxt = data.find(MAGIC, pos + 1)
        while nxt != -1 and _record_at(data, nxt) is None:
            nxt = data.find(MAGIC, nxt + 1)
        if nxt == -1:
            out.torn = len(data) - pos
            break
        out.records.append(Damage(pos, nxt))
        pos = nxt
    return out


def _headers(path: Path, start: int) -> Iterator[tuple[int, int, float]]:
    """(start, end, received at) of each record from `start`, by reading headers and seeking
    over bodies (status only: the flush checks every record whole)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = start
        while pos + _HEAD.size <= size:
            f.seek(pos)
            magic, length, received_at, _ = _HEAD.unpack(f.read(_HEAD.size))
            end = pos + _HEAD.size + length
            if magic != MAGIC or end > size:
                return  # a torn tail, or damage: the flush sorts it out
            yield pos, end, received_at
            pos = end


def last_offset(progress: bytes) -> int:
    """Where publishing got to, from a progress file's bytes (a torn last write is ignored)."""
    whole = len(progress) - len(progress) % _OFFSET.size
    return _OFFSET.unpack_from(progress, whole - _OFFSET.size)[0] if whole else 0


@dataclass
class _Counted:
    """The whole records of a segment from `start` up to `end`, as status() last read them."""

    start: int
    end: int
    entries: int = 0
    first_received_at: float | None = None

    def add(self, heads: Iterator[tuple[int, int, float]]) -> None:
        """Count more records (read on from `end`)."""
        for _, end, received_at in heads:
            if self.first_received_at is None:
                self.first_received_at = received_at
            self.entries += 1
            self.end = end


@dataclass
class SpoolStatus:
    """What `switchboard spool status` and the metrics show."""

    entries: int = 0
    bytes: int = 0
    oldest_received_at: float | None = None
    segments: int = 0
    kept: int = 0  # records set aside as unopenable
    corrupt_bytes: int = 0

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest waiting entry has waited (0 with none)."""
        return max(0.0, now - self.oldest_received_at) if self.oldest_received_at else 0.0


@dataclass
class Flushed:
    """What one flush did."""

    published: int = 0
    kept: int = 0
    torn: int = 0
    failed: str | None = None  # why it stopped early (the publish's error), None if it did not


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return own.st_nlink > 0 and (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Spool:
    """One host's spool directory, as used by one process (thread- and gevent-safe)."""

    def __init__(self, directory: Path, sealer: Sealer, max_bytes: int,
                 max_record_bytes: int) -> None:
        self.directory = directory
        self._sealer = sealer
        self._max_bytes = max_bytes
        self._max_record = max_record_bytes
        self._lock = threading.Lock()  # one append at a time in this process
        self._flush_lock = threading.Lock()
        self._segment: str | None = None
        self._status_lock = threading.Lock()
        self._counted: dict[str, _Counted] = {}  # status(): what each segment was seen to hold

    # -- the write path ------------------------------------------------------------------------

    def append(self, entry: Spooled) -> None:
        """Keep `entry` on disk (fsynced) or raise SpoolRefused; only after it returns may the
        receiver answer 2xx."""
        record = encode(entry, self._sealer)
        if len(record) > self._max_record:
            raise SpoolRefused("too-large")
        with self._lock:
            for _ in range(5):  # a flusher claimed the segment, or it is full: another
                if self._append_to_segment(record):
                    return
            raise SpoolRefused("contended")

    def _append_to_segment(self, record: bytes) -> bool:
        try:
            return self._append_or_not(record)
        except OSError as exc:  # whatever the disk said: not kept
            raise SpoolRefused(_reason(exc)) from exc

    def _append_or_not(self, record: bytes) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._segment is None:
            self._segment = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(3)}"
        path = self.directory / (self._segment + OPEN)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:  # closing the fd releases the lock
            if not _try_lock(fd) or not _same_file(path, fd):
                self._segment = None  # being claimed by a flusher, or already flushed
                return False
            size = os.fstat(fd).st_size
            if size >= SEGMENT_BYTES:  # bounded segments: a flush reads one at a time
                self._segment = None
                return False
            if self._usage() + len(record) > self._max_bytes:
                raise SpoolRefused("full")
            try:
                _write_all(fd, record)
                os.fsync(fd)
                if size == 0:  # a new file: its name must survive a crash too
                    _fsync_dir(self.directory)
            except OSError as exc:
                # A half-written record would sit in front of the next one: cut it off. If
                # even that fails, this segment is never appended to again (its torn tail is
                # then dropped by the reader, as after a crash).
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    self._segment = None
                raise SpoolRefused(_reason(exc)) from exc
            return True
        finally:
            os.close(fd)

    def _usage(self) -> int:
        total = 0
        for entry in os.scandir(self.directory):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue  # flushed meanwhile
        return total

    # -- reading -------------------------------------------------------------------------------

    def _names(self, suffixes: tuple[str, ...]) -> list[str]:
        """Files with these suffixes, oldest segment first (names start with the time)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(suffixes))

    def status(self) -> SpoolStatus:
        """Entries waiting, their bytes and the oldest one's time. Reads the record headers
        only (no key needed, nothing opened), and of each segment only what was appended since
        the last call: a scrape of /metrics does it, during an outage, every few seconds."""
        out = SpoolStatus()
        seen: dict[str, _Counted] = {}
        with self._status_lock:
            for name in self._names((*_SEGMENTS, KEPT, CORRUPT)):
                path = self.directory / name
                try:
                    if name.endswith(CORRUPT):
                        out.corrupt_bytes += path.stat().st_size
                        continue
                    start = 0
                    if name.endswith(FLUSHING):
                        progress = self.directory / (_base(name) + PROGRESS)
                        start = last_offset(progress.read_bytes()) if progress.exists() else 0
                    counted = self._counted.get(name)
                    if counted is None or counted.start != start:
                        counted = _Counted(start, start)
                    counted.add(_headers(path, counted.end))
                except OSError:
                    continue  # flushed meanwhile
                seen[name] = counted
                if name.endswith(KEPT):
                    out.kept += counted.entries
                    continue
                out.segments += 1
                out.entries += counted.entries
                out.bytes += counted.end - counted.start
                first = counted.first_received_at
                if first is not None and (out.oldest_received_at is None
                                          or first < out.oldest_received_at):
                    out.oldest_received_at = first
            self._counted = seen
        return out

    def waiting(self) -> bool:
        """Whether any segment is there to flush (one directory listing)."""
        return bool(self._names(_SEGMENTS))

    # -- the flush -----------------------------------------------------------------------------

    def flush(self, publish: Callable[[Spooled], None], kept: bool = False) -> Flushed:
        """Publish every entry of every segment no one else holds, oldest segment first, each
        exactly once (see the module doc). Stops at the first publish that raises (Redis is
        still away): the segment keeps its progress for the next flush. `kept` also retries
        the records set aside as unopenable (after the key came back)."""
        out = Flushed()
        with self._flush_lock:  # one flush per process; other processes: the flocks
            for name in self._names((*_SEGMENTS, KEPT) if kept else _SEGMENTS):
                claimed = self._claim(name)
                if claimed == _GONE:
                    continue
                if isinstance(claimed, str):
                    # An older segment is being appended to or flushed by another process:
                    # its entries go first, so this flush stops here (the next one goes on).
                    break
                fd, path = claimed
                try:
                    self._flush_segment(fd, path, publish, out)
                finally:
                    os.close(fd)  # releases the claim
                if out.failed:
                    break
        return out

    def _claim(self, name: str) -> tuple[int, Path] | str:
        """The segment, locked and named `.flushing`; or _GONE (flushed meanwhile), or _BUSY
        (its writer or another flusher holds it)."""
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return _GONE
        if not _try_lock(fd):
            os.close(fd)
            return _BUSY
        if not _same_file(path, fd):
            os.close(fd)
            return _GONE
        if not name.endswith(FLUSHING):
            claimed = self.directory / (_base(name) + FLUSHING)
            try:
                if claimed.exists():  # a `.kept` file of a segment still flushing: later
                    os.close(fd)
                    return _BUSY
                os.rename(path, claimed)
                _fsync_dir(self.directory)
            except OSError:
                os.close(fd)
                raise
            path = claimed
        return fd, path

    def _flush_segment(self, fd: int, path: Path, publish: Callable[[Spooled], None],
                       out: Flushed) -> None:
        progress_path = self.directory / (_base(path.name) + PROGRESS)
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        progress = _Progress(progress_path)
        try:
            found = scan(data, progress.start)
            for item in found.records:
                if isinstance(item, Damage):
                    self._set_aside(path, CORRUPT, data[item.start:item.end])
                    log.error("spool: %d damaged bytes in %s set aside", item.end - item.start,
                              path.name)
                else:
                    try:
                        entry = decode(item.body, item.received_at, self._sealer)
                    except Unsealable as exc:
                        self._set_aside(path, KEPT, data[item.start:item.end])
                        log.error("spool: an entry of %s cannot be opened (%s): kept in %s",
                                  path.name, type(exc).__name__, _base(path.name) + KEPT)
                        out.kept += 1
                    else:
                        try:
                            publish(entry)
                        except Exception as exc:  # Redis still away: next time
                            out.failed = type(exc).__name__
                            return
                        out.published += 1
                progress.record(item.end)
            if found.torn:
                out.torn += 1
                log.warning("spool: dropped an unfinished last record of %s (%d bytes, "
                            "written by a process that died before it was fsynced)",
                            path.name, found.torn)
        finally:
            progress.close()
        # Every record is published: the segment goes first, then its progress (a crash in
        # between leaves a progress file without a segment, removed below next time).
        path.unlink()
        progress_path.unlink(missing_ok=True)
        _fsync_dir(self.directory)

    def _set_aside(self, path: Path, suffix: str, raw: bytes) -> None:
        target = self.directory / (_base(path.name) + suffix)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _write_all(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.directory)

    def remove_orphans(self) -> None:
        """Progress files whose segment is gone (a crash between the two unlinks)."""
        segments = {_base(n) for n in self._names((*_SEGMENTS, KEPT))}
        for name in self._names((PROGRESS,)):
            if _base(name) not in segments:
                (self.directory / name).unlink(missing_ok=True)


def spool_from_settings(settings: Settings) -> Spool | None:
    """The configured spool (None: SPOOL_DIR is empty)."""
    path = settings.spool_path
    if path is None:
        return None
    return Spool(path, settings.sealer(), settings.spool_max_bytes,
                 settings.spool_max_record_bytes)


class _Progress:
    """A segment's progress file: the end offset of each record done, appended and fsynced.

    On a full disk the file may not grow: the flush then goes on without it (the segment is
    removed at the end, freeing the space). A crash meanwhile publishes entries again from the
    last recorded offset, and the publish's per-entry marker makes each of those a no-op."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = None
        self.start = 0
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            size = os.fstat(self._fd).st_size
            self.start = last_offset(os.pread(self._fd, size, 0))
            if size % _OFFSET.size:  # a torn write: cut it before appending
                os.ftruncate(self._fd, size - size % _OFFSET.size)
        except OSError as exc:
            if self._fd is None and path.exists():
                raise  # there, yet unreadable: never start again from 0 blindly
            self._lost(exc)

    def record(self, offset: int) -> None:
        """Records before `offset` are done."""
        if self._fd is None:
            return
        try:
            _write_all(self._fd, _OFFSET.pack(offset))
            os.fsync(self._fd)
        except OSError as exc:
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        log.warning("spool: progress not recorded (%s): a crash now would publish some "
                    "entries again, each a no-op", exc.strerror or type(exc).__name__)
        self.close()

    def close(self) -> None:
        """Done with the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _base(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _reason(exc: OSError) -> str:
    import errno

    return "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "disk-error"


class Flusher:
    """A loop publishing the spool's entries every `interval` seconds (a thread; a greenlet
    under gunicorn's gevent workers, whose monkey-patching makes threading cooperative)."""

    def __init__(self, spool: Spool, publish: Callable[[Spooled], None], interval: float,
                 on_flushed: Callable[[Flushed], None] | None = None) -> None:
        self._spool = spool
        self._publish = publish
        self._interval = interval
        self._on_flushed = on_flushed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop (once per process, after the fork)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-flusher",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the loop (what is claimed stays claimed only until this process exits)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._spool.waiting():
                    continue
                done = self._spool.flush(self._publish)
                self._spool.remove_orphans()
                if self._on_flushed:
                    self._on_flushed(done)
            except Exception:  # never let the loop die: the next round tries again
                log.exception("spool: flush failed")

