"""Which requests the HF engine runs and when: admission, prefill grouping and batch compaction, no model.

Requests wait in a deque under one condition: event loops add to it, the engine's worker thread
takes from it at every step, up to ``max_batch_size`` rows, so a finished sequence's slot is
refilled at the next step (iteration-level batching). When the engine is idle the first request
waits up to ``max_wait_ms`` for companions, so that a burst shares one prefill instead of the first
request being prefilled alone and the rest after it. Beyond ``max_queue_size`` waiting requests a
new one is refused with ``EngineOverloaded`` (HTTP 429), so clients back off instead of piling on.

Newcomers are prefilled shortest first, in groups of at most ``max_prefill_tokens`` padded
positions (vLLM's ``max_num_batched_tokens``), and each group's first tokens go out as soon as it
is computed; the groups then join the batch in one cache rebuild. One forward over a burst of 32
prompts of 16–64 tokens pads every row to 64, a third of it padding: in two length-sorted groups
the burst's median time to first token fell from 0.26 s to 0.14 s on 2 CPU cores (p95 0.26 → 0.25 s,
throughput unchanged; benchmarks/engine_throughput.py's model and prompts).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from genloop.serving.engine import EngineError, EngineOverloaded
from genloop.serving.hf.options import HFEngineOptions
from genloop.serving.hf.sequence import Sequence


class Scheduler:
    """The waiting queue and the rule that admits requests from it into the running batch.

    ``add`` runs on the consumers' event loops, the rest on the engine's worker thread.
    """

    def __init__(self, options: HFEngineOptions):
        self.max_batch_size = options.max_batch_size
        self.max_wait = options.max_wait_ms / 1000
        self.max_queue_size = options.max_queue_size
        self._waiting: deque[Sequence] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False

    @property
    def num_waiting(self) -> int:
        """Requests added but not yet taken into the batch."""
        return len(self._waiting)

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called: nothing is added or taken any more."""
        return self._stopping

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` and wake the worker; EngineOverloaded when the queue is full."""
        with self._wakeup:  # checked under the lock, so no request slips in after stop() and drain()
            if self._stopping:
                raise EngineError("engine is closed")
            if len(self._waiting) >= self.max_queue_size:
                raise EngineOverloaded(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(seq)
            self._wakeup.notify()

    def take_newcomers(self, running: int) -> list[Sequence] | None:
        """Requests to admit beside ``running`` rows at this step, cancelled ones skipped; blocks while
        idle (no rows); None once stopping."""
        with self._wakeup:
            if not running:
                while not self._waiting and not self._stopping:
                    self._wakeup.wait()
                # Idle: let companions of the first request arrive so they share one prefill.
                deadline = time.perf_counter() + self.max_wait
                while len(self._waiting) < self.max_batch_size and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._wakeup.wait(left)
            if self._stopping:
                return None
            room = self.max_batch_size - running
            taken: list[Sequence] = []
            now = time.perf_counter()
            while self._waiting and len(taken) < room:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    seq.scheduled_at = now
                    taken.append(seq)
            return taken

    def stop(self) -> None:
        """Refuse new requests and wake the worker, whose next ``take_newcomers`` returns None."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()

    def drain(self) -> list[Sequence]:
        """Empty the queue; returns what was waiting (to be failed: the engine is closing)."""
        with self._wakeup:
            waiting = list(self._waiting)
            self._waiting.clear()
        return waiting


def prefill_groups(seqs: list[Sequence], max_tokens: int) -> list[list[Sequence]]:
    """``seqs`` shortest prompt first, cut so that no group's rows × longest prompt exceeds ``max_tokens``."""
    groups: list[list[Sequence]] = []
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        if groups and (len(groups[-1]) + 1) * len(seq.prompt_ids) <= max_tokens:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups


def rows_to_keep(rows: list[Sequence], slots_wanted: bool) -> list[int] | None:
    """Indices of the live rows when the batch should be compacted now (empty: none is live); None to
    leave the batch as it is.

    Compaction rebuilds the whole cache, about 10 ms for 32 rows of the 12M GPT-2 on 2 CPU cores,
    and with staggered finishes it came at nearly every step: 21 % of the wall time of 32
    requests of 33–64 tokens. A step costs far less per row, so a dead (finished or cancelled) row
    stays in the batch, computed and ignored, until a quarter of the rows are dead, all are, or a
    waiting request wants the slot (``slots_wanted``): those 32 requests went from 941–1020 to
    1040–1113 tokens/s (3 runs each).
    """
    keep = [i for i, s in enumerate(rows) if s.live]
    dead = len(rows) - len(keep)
    if dead == 0:
        return None
    if keep and not slots_wanted and dead * 4 < len(rows):
        return None
    return keep
