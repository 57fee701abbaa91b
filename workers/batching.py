"""Request batching for the replica: concurrent queries encoded and decoded together.

One thread takes every query waiting when it becomes free (up to `max_batch`), encodes them in
one encoder pass per index version and runs their beam searches as one batch per beam size:
the models' matrix products over B queries cost far less than B single-query passes (on this
2-core machine, 8 text queries encode and decode in ~10 ms each instead of ~32 ms), so under
load the queue drains faster than it fills. Nothing waits for a batch to fill: a query arriving
while nothing is being computed is computed at once, alone, in its own request thread; queries
arriving meanwhile queue up for the batching thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
ALL_MODALITIES = (0, 1, 2)


@dataclass
class _Pending:
    index: object  # genius.index.GeniusIndex
    text: str | None
    image: bytes | None
    beam_size: int
    modalities: list[int] | None
    future: Future = field(default_factory=Future)
    query: np.ndarray | None = None  # (D,) float32, once encoded


class QueryBatcher:
    def __init__(self, max_batch: int = 32, metrics=None):
        self.max_batch = max_batch
        self.metrics = metrics
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._busy = threading.Lock()  # held while a query or a batch is encoded and decoded
        self._thread = threading.Thread(target=self._run, name="genius-batch", daemon=True)
        self._thread.start()

    def search(self, index, text: str | None, image: bytes | None, beam_size: int, modalities: list[int] | None,
               timeout: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query embedding, items, beam scores): what index.embed + index.candidates give for
        this one query, computed together with whatever else is waiting."""
        pending = _Pending(index, text, image, beam_size, modalities)
        # Nothing being computed: compute it here at once. Handing a lone query to the batching
        # thread cost ~40 % more latency at one client (measured with bench/serve.py's server).
        if self._busy.acquire(blocking=False):
            try:
                self._process([pending])
            finally:
                self._busy.release()
        else:
            self._queue.put(pending)  # the batching thread takes it with whatever else waits
        return pending.future.result(timeout=timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            with self._busy:
                self._process(batch)

    def _process(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        by_index: dict[int, list[_Pending]] = {}
        for p in live:
            by_index.setdefault(id(p.index), []).append(p)
        for group in by_index.values():
            self._guarded(self._encode, group)
            by_beam: dict[int, list[_Pending]] = {}
            for p in group:
                if not p.future.done():
                    by_beam.setdefault(p.beam_size, []).append(p)
            for same_beam in by_beam.values():
                self._guarded(self._decode, same_beam)

    def _guarded(self, step, group: list[_Pending]) -> None:
        try:
            step(group)
        except BaseException as err:  # noqa: BLE001 - every waiting request gets the error
            log.exception("a batch of %d queries failed", len(group))
            for p in group:
                if not p.future.done():
                    p.future.set_exception(err)

    def _observe(self, stage: str, seconds: float, count: int) -> None:
        if self.metrics is not None:
            for _ in range(count):  # every query of the batch waited that long
                self.metrics.stages.labels(stage).observe(seconds)

    def _encode(self, group: list[_Pending]) -> None:
        from genius.items import Items

        t0 = time.perf_counter()
        texts = [p.text for p in group]
        images = [p.image for p in group]
        queries = group[0].index.embed(Items(texts=texts if any(t is not None for t in texts) else None,
                                             images=images if any(i is not None for i in images) else None))
        for p, q in zip(group, queries):
            p.query = q
        self._observe("encode", time.perf_counter() - t0, len(group))

    def _decode(self, group: list[_Pending]) -> None:
        t0 = time.perf_counter()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(group))
        queries = np.stack([p.query for p in group])
        # A query without a modality filter asks for all three: the same beams and items.
        modalities = None
        if any(p.modalities is not None for p in group):
            modalities = [p.modalities if p.modalities is not None else list(ALL_MODALITIES) for p in group]
        found = group[0].index.candidates(queries, group[0].beam_size, modalities)
        self._observe("decode", time.perf_counter() - t0, len(group))
        for p, (items, scores) in zip(group, found):
            p.future.set_result((p.query, items, scores))
