"""Request batching for the replica: concurrent queries decoded in one beam search.

One decoding thread takes every query waiting when it becomes free (up to `max_batch`, grouped by
index version and beam size) and runs their beam searches as one batch: the decoder's matrix
products over B queries cost far less than B single-query passes, so under load the queue
drains faster than it fills. Nothing waits for a batch to fill: a query arriving at an idle
replica is decoded at once, alone.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
ALL_MODALITIES = (0, 1, 2)


@dataclass
class _Pending:
    index: object  # genius.index.GeniusIndex
    query: np.ndarray  # (D,) float32
    beam_size: int
    modalities: list[int] | None
    future: Future = field(default_factory=Future)


class DecodeBatcher:
    def __init__(self, max_batch: int = 32, metrics=None):
        self.max_batch = max_batch
        self.metrics = metrics
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="genius-decode", daemon=True)
        self._thread.start()

    def candidates(self, index, query: np.ndarray, beam_size: int, modalities: list[int] | None,
                   timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """What index.candidates gives for this one query, decoded together with whatever else
        is waiting."""
        pending = _Pending(index, query, beam_size, modalities)
        self._queue.put(pending)
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
            groups: dict[tuple[int, int], list[_Pending]] = {}
            for p in batch:
                groups.setdefault((id(p.index), p.beam_size), []).append(p)
            for group in groups.values():
                self._decode(group)

    def _decode(self, group: list[_Pending]) -> None:
        live = [p for p in group if p.future.set_running_or_notify_cancel()]
        if not live:
            return
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(live))
        try:
            queries = np.stack([p.query for p in live])
            # A query without a modality filter asks for all three: the same beams and items.
            modalities = None
            if any(p.modalities is not None for p in live):
                modalities = [p.modalities if p.modalities is not None else list(ALL_MODALITIES) for p in live]
            found = live[0].index.candidates(queries, live[0].beam_size, modalities)
        except BaseException as err:  # noqa: BLE001 - every waiting request gets the error
            log.exception("decoding a batch of %d queries failed", len(live))
            for p in live:
                p.future.set_exception(err)
            return
        for p, result in zip(live, found):
            p.future.set_result(result)
