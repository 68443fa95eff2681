"""Per-instance pre-analysis: the per-image work starts as soon as an instance is durable.

A screening study arrives one image at a time, seconds apart; the per-image work (decode,
VOI/polarity, breast mask, ROI finding, crops, display image) needs no other image of the
study. :class:`PreAnalysis` runs it in a small bounded thread pool fed by the receiver right
after an instance is stored and committed (:meth:`PreAnalysis.submit` only queues: it never
delays a C-STORE answer, and a full queue simply leaves the image to the study's analysis). At
study completion the worker's analysis finds the images already prepared (or waits for the one
in flight) and only the whole-study remainder is left: the classifier batch, Grad-CAM, the
reports and the delivery.

Kept across restarts: each result is written under ``data_dir/preanalysis/<study>/`` (a pickle
of the pipeline's own per-image tuple, behind a length + CRC32 header; written to a temporary
name then renamed; no fsync: it is a cache, a torn or missing file is recomputed). It is reused
only under the same :attr:`AnalysisPipeline.preparation_key` (model, detector, crop and display
settings) and the same file (an instance's content never changes: a different one under the same
SOP Instance UID is refused at C-STORE). Dropped when the study's result is recorded, and at
start for studies no longer waiting for analysis; at start, instances of studies still waiting
that have no result yet are queued again.

Order: not first in, first out. An image of a study whose analysis has started (the worker is
waiting for it) goes first; then images of the study with the most images submitted so far, so
that the image that completes a study (the fourth view, usually) does not wait behind the first
images of studies that arrive after it has begun (shortest remaining work first; ties in
arrival order).

The files are written and read only by the node, in its own ``data_dir`` (like its database):
pickle is safe there. No database writes: nothing here changes a state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import pickle
import queue
import shutil
import struct
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from node.analysis.result import ImageInput
from node.db import Database, Instance, Study
from node.log import event
from node.store import Spool

log = logging.getLogger("node.preanalysis")

_MAGIC = b"MNPA1"
_HEADER = struct.Struct("<5sQI")  # magic, payload length, CRC32 of the payload
#: Studies whose per-image results stay in memory (the others are read back from disk).
MEMORY_STUDIES = 4
#: Study states whose instances are still to be analysed.
WAITING_STATES = ("receiving", "complete", "analysing")


def _digest(text: str, n: int = 32) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


#: Rank of an image whose study's analysis has started (the worker waits for it).
URGENT = 0
_NORMAL = 1
_STOP_RANK = -1  # the stop sentinels overtake everything


@dataclass(frozen=True)
class _Task:
    study_uid: str
    key: str  # preparation key
    item: ImageInput


_Entry = tuple[int, int, int, "_Task | None", "Future[Any] | None"]


def _without_canvas(hit: Any) -> Any:
    """The prepared tuple without its all-zero heat-map canvas (4 bytes a display pixel, ~14
    MB for a 2048-pixel display): the analysis makes a fresh one for each run anyway."""
    ia = hit[0]
    if getattr(ia, "cam", None) is None:
        return hit
    return (dataclasses.replace(ia, cam=None), *hit[1:])


class PreparedImages:
    """The ``cache`` mapping one study's analysis receives (file path -> prepared image).

    ``get`` returns a result computed by the pre-analysis pool (memory or disk), waits for one
    being computed right now, and takes over (cancels) one still queued: the analysis then
    computes it itself, never waiting behind other studies' images."""

    def __init__(self, owner: PreAnalysis, study_uid: str, key: str) -> None:
        self.owner, self.study_uid, self.key = owner, study_uid, key
        self.hits = 0  # images found prepared (the analysis did not compute them)

    def get(self, path: str, default: Any = None) -> Any:
        hit = self.owner.lookup(self.study_uid, self.key, path)
        if hit is None:
            return default
        self.hits += 1
        return hit

    def __setitem__(self, path: str, value: Any) -> None:
        self.owner.remember(self.study_uid, self.key, path, value)

    def __contains__(self, path: object) -> bool:
        return self.get(str(path)) is not None


class PreAnalysis:
    """A bounded pool of ``workers`` threads over ``analyser.prepare_one`` (see the module).

    ``max_pending``: images queued at most (beyond: left to the study's analysis, counted);
    ``max_images_per_study``: images of one study pre-analysed at most (a 500-instance study
    does not flood the pool with images the analysis will not select)."""

    def __init__(self, db: Database, spool: Spool, analyser: Any, *, workers: int = 2,
                 max_pending: int = 32, max_images_per_study: int = 16) -> None:
        self.db, self.spool, self.analyser = db, spool, analyser
        self.root = spool.root / "preanalysis"
        self.workers = max(1, int(workers))
        self.max_images_per_study = int(max_images_per_study)
        self.max_pending = max(1, max_pending)
        # (rank, -images of the study so far, arrival, task, future); see the module docstring.
        # Bounded by hand (``_pending``): re-ranked duplicates of a queued image do not count.
        self._queue: queue.PriorityQueue[_Entry] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._pending = 0
        self._urgent: set[str] = set()  # studies whose analysis has started
        self._tasks: dict[tuple[str, str], _Task] = {}  # (study, path) -> its queued task
        self._lock = threading.Lock()
        # study uid -> {file path: result}; most recently used last, MEMORY_STUDIES at most.
        self._memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._keys: dict[str, str] = {}  # study uid -> preparation key of its memory entries
        self._futures: dict[tuple[str, str], Future] = {}  # (study, path) -> queued/running
        self._submitted: dict[str, int] = {}  # study uid -> images submitted
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.stats = {"submitted": 0, "done": 0, "dropped_full": 0, "taken_over": 0,
                      "from_disk": 0, "seconds": 0.0}

    # -- lifecycle -------------------------------------------------------------------------------
    @staticmethod
    def supported(analyser: Any) -> bool:
        return callable(getattr(analyser, "prepare_one", None)) and \
            isinstance(getattr(analyser, "preparation_key", None), str)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()
        for n in range(self.workers):
            t = threading.Thread(target=self._run, name=f"preanalysis-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        self._resubmit_waiting()

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._queue.put_nowait((_STOP_RANK, 0, next(self._seq), None, None))

    # -- feeding ---------------------------------------------------------------------------------
    def submit(self, study_uid: str, relpath: str, sop_uid: str, sop_class_uid: str) -> bool:
        """Queue one durable instance (called by the receiver after the commit; O(1), never
        blocks). False when it was not queued (queue full, study's share used, stopping)."""
        if self._stop.is_set():
            return False
        path = str(self.spool.path(relpath))
        key = self.analyser.preparation_key
        with self._lock:
            if self._submitted.get(study_uid, 0) >= self.max_images_per_study:
                return False
            if (study_uid, path) in self._futures:
                return False
            if self._pending >= self.max_pending:
                self.stats["dropped_full"] += 1
                return False
            future: Future[Any] = Future()
            count = self._submitted.get(study_uid, 0) + 1
            rank = URGENT if study_uid in self._urgent else _NORMAL
            task = _Task(study_uid, key, ImageInput(Path(path), sop_uid, sop_class_uid))
            self._queue.put_nowait((rank, -count, next(self._seq), task, future))
            self._pending += 1
            self._futures[(study_uid, path)] = future
            self._tasks[(study_uid, path)] = task
            self._submitted[study_uid] = count
            self.stats["submitted"] += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            _, _, _, task, future = self._queue.get()
            if task is None or future is None:
                return
            with self._lock:  # one of its entries (re-ranked duplicates) runs it, once
                if future.running() or future.done():
                    continue
                self._pending -= 1
                if not future.set_running_or_notify_cancel():  # taken over by the analysis
                    continue
            path = str(task.item.path)
            try:
                hit = self.lookup_stored(task.study_uid, task.key, path)
                # one read: a model switch meanwhile does not mix two models' work
                analyser = getattr(self.analyser, "current", self.analyser)
                if hit is None and task.key == analyser.preparation_key:
                    t0 = time.perf_counter()
                    hit = _without_canvas(analyser.prepare_one(task.item))
                    seconds = time.perf_counter() - t0
                    self._save(task.study_uid, task.key, path, hit)
                    self.remember(task.study_uid, task.key, path, hit)
                    log.debug("preanalysed %s in %.0f ms", task.item.sop_instance_uid,
                              1000 * seconds)
                    with self._lock:  # counted once kept (tests and figures read it)
                        self.stats["seconds"] += seconds
                        self.stats["done"] += 1
                future.set_result(hit)
            except Exception as exc:  # never let a pool thread die; the analysis redoes it
                log.exception("preanalysis.error sop=%s", task.item.sop_instance_uid)
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._futures.pop((task.study_uid, path), None)
                    self._tasks.pop((task.study_uid, path), None)

    def _resubmit_waiting(self) -> None:
        """After a restart: instances of studies still to be analysed, not pre-analysed yet."""
        try:
            with self.db.session() as s:
                rows = s.execute(
                    select(Study.study_uid, Instance.relpath, Instance.sop_uid,
                           Instance.sop_class_uid)
                    .join(Instance, Instance.study_id == Study.id)
                    .where(Study.state.in_(WAITING_STATES)).order_by(Instance.id)
                ).all()
        except Exception:
            log.exception("preanalysis.resubmit_failed")
            return
        key = self.analyser.preparation_key
        n = 0
        for study_uid, relpath, sop_uid, sop_class in rows:
            if not self._file(study_uid, key, str(self.spool.path(relpath))).exists():
                n += self.submit(study_uid, relpath, sop_uid, sop_class)
        if n:
            event(log, "preanalysis.resumed", images=n)

    # -- the analysis' side ----------------------------------------------------------------------
    def images_of(self, study_uid: str) -> PreparedImages:
        """The ``cache`` for this study's analysis under the current preparation key; the
        study's images still queued move to the front of the pool (:meth:`prioritise`)."""
        self.prioritise(study_uid)
        return PreparedImages(self, study_uid, self.analyser.preparation_key)

    def prioritise(self, study_uid: str) -> int:
        """The study's analysis has started: its queued images (and any submitted later) go
        before every other image. Returns how many queued images were moved."""
        with self._lock:
            self._urgent.add(study_uid)
            queued = [(self._tasks[k], f) for k, f in self._futures.items()
                      if k[0] == study_uid and k in self._tasks
                      and not (f.running() or f.done())]
            for task, future in queued:  # a duplicate entry: the first one taken runs it
                self._queue.put_nowait((URGENT, 0, next(self._seq), task, future))
        return len(queued)

    def lookup(self, study_uid: str, key: str, path: str) -> Any:
        """A result for (study, file) under ``key``: memory, then one being computed (waited
        for), then disk; a queued one is cancelled (the caller computes it); None if none."""
        with self._lock:
            future = self._futures.get((study_uid, path))
        if future is not None:
            with self._lock:  # with the pool's check-and-run: counted out of the queue once
                cancelled = future.cancel()
                if cancelled:
                    self._futures.pop((study_uid, path), None)
                    self._tasks.pop((study_uid, path), None)
                    self._pending -= 1
                    self.stats["taken_over"] += 1
            if not cancelled:
                try:
                    future.result()
                except Exception:  # noqa: BLE001 - logged in the pool thread
                    return None  # it failed in the pool: the analysis tries (and reports) it
        return self.lookup_stored(study_uid, key, path)

    def lookup_stored(self, study_uid: str, key: str, path: str) -> Any:
        with self._lock:
            if self._keys.get(study_uid) == key:
                hit = self._memory.get(study_uid, {}).get(path)
                if hit is not None:
                    self._memory.move_to_end(study_uid)
                    return hit
        hit = self._load(study_uid, key, path)
        if hit is not None:
            with self._lock:
                self.stats["from_disk"] += 1
            self.remember(study_uid, key, path, hit)
        return hit

    def remember(self, study_uid: str, key: str, path: str, hit: Any) -> None:
        with self._lock:
            if self._keys.get(study_uid) != key:
                self._memory.pop(study_uid, None)
                self._keys[study_uid] = key
            self._memory.setdefault(study_uid, {})[path] = hit
            self._memory.move_to_end(study_uid)
            while len(self._memory) > MEMORY_STUDIES:
                old, _ = self._memory.popitem(last=False)
                self._keys.pop(old, None)

    def drop_study(self, study_uid: str) -> None:
        """The study's result was recorded (or it is gone): its per-image results go."""
        with self._lock:
            self._memory.pop(study_uid, None)
            self._keys.pop(study_uid, None)
            self._submitted.pop(study_uid, None)
            self._urgent.discard(study_uid)
        shutil.rmtree(self._study_dir(study_uid), ignore_errors=True)

    def sweep(self) -> int:
        """Remove the stored results of studies that no longer wait for an analysis."""
        if not self.root.exists():
            return 0
        with self.db.session() as s:
            waiting = {_digest(uid) for uid in s.execute(
                select(Study.study_uid).where(Study.state.in_(WAITING_STATES))).scalars()}
        n = 0
        for d in self.root.iterdir():
            if d.name not in waiting:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n

    # -- files -----------------------------------------------------------------------------------
    def _study_dir(self, study_uid: str) -> Path:
        return self.root / _digest(study_uid)

    def _file(self, study_uid: str, key: str, path: str) -> Path:
        return self._study_dir(study_uid) / f"{key[:16]}-{_digest(path)}.pa"

    def _save(self, study_uid: str, key: str, path: str, hit: Any) -> None:
        target = self._file(study_uid, key, path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            payload = pickle.dumps(hit, protocol=5)
            tmp = target.with_suffix(f".tmp{threading.get_ident()}")
            with open(tmp, "wb") as fh:
                fh.write(_HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)))
                fh.write(payload)
            tmp.replace(target)
        except OSError as exc:  # a full disk loses only the head start
            log.warning("preanalysis: cannot keep %s: %s", target.name, exc)

    def _load(self, study_uid: str, key: str, path: str) -> Any:
        target = self._file(study_uid, key, path)
        try:
            data = target.read_bytes()
        except OSError:
            return None
        try:
            magic, length, crc = _HEADER.unpack_from(data)
            payload = memoryview(data)[_HEADER.size:]
            if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                raise ValueError("torn or foreign file")
            return pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - any unpickling error: recomputed
            log.warning("preanalysis: %s unusable (%s): recomputed", target.name, exc)
            target.unlink(missing_ok=True)
            return None
