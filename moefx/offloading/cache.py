"""A fixed pool of device memory slots that offloaded experts stream through.

Each slot holds one expert of one layer. A layer asks for the experts its tokens were routed
to; the cache serves resident ones (hits, or prefetch hits when a prefetch guess brought them)
and loads the others (misses) from the store into slots freed in least-recently-used order,
never evicting an expert the running layer still needs. With ``prefetch`` the loads run on one
background thread (on a GPU, on a side stream): while a layer
computes one expert, the next ones it needs are loading, and the experts the next layer will
most likely need (by a running average of its routing, or all of them when they fit) are loaded
when room allows. The next layer is the one that ran after this one last time (module order
until then): models that run their layers out of module order, or an encoder-decoder whose
decoder repeats while generating, prefetch the layer that actually comes. Without ``prefetch``,
loads run in the caller's thread when an expert is asked for.

All bookkeeping happens in the caller's thread; the loader thread only copies bytes into a slot
it was handed, and the slot is not handed to anything else until that copy is done.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from moefx.offloading.store import ExpertLayout

LOADER_THREAD_PREFIX = "moefx-offload"
_SCORE_DECAY = 0.7  # weight of the past in a layer's routing average (recent steps matter most in generation)


@dataclass(frozen=True)
class OffloadStats:
    """What the expert cache did since the model was offloaded (or since the last reset).

    Each request (a layer call asking for an expert it routed tokens to) is one of: a hit (the
    expert was in a slot, loaded for an earlier request), a prefetch hit (in a slot, or on its way,
    because a prefetch guessed it before the layer asked) or a miss (not in the cache when the layer
    asked: loaded for this call, ahead of its compute with ``prefetch``, else on the spot)."""

    requests: int  # experts asked for by layers (one per layer call and expert with tokens)
    hits: int  # requests for an expert already resident from an earlier request
    prefetch_hits: int  # requests served by a prefetch guess (its first use)
    misses: int  # requests for an expert not in the cache: each loads it
    loads: int  # experts copied into a slot: misses + prefetch_loads
    prefetch_loads: int  # guesses: loads of experts the next layer had not asked for yet
    evictions: int  # resident experts dropped to make room
    bytes_moved: int  # expert bytes copied into slots
    wait_seconds: float  # time the compute thread spent waiting for loads
    tokens: int  # token rows through the busiest offloaded layer (every token, in a decoder-only model)
    num_slots: int  # the device pool: experts it holds at once
    slot_bytes: int  # bytes of one slot (the largest expert)

    @property
    def bytes_per_token(self) -> float:
        """Expert bytes moved per token (``bytes_moved / tokens``; 0 before any token)."""
        return self.bytes_moved / self.tokens if self.tokens else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of requests found resident, prefetched or not: ``(hits + prefetch_hits) / requests``."""
        return (self.hits + self.prefetch_hits) / self.requests if self.requests else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "bytes_per_token": self.bytes_per_token, "hit_rate": self.hit_rate}

    def __repr__(self) -> str:  # what as_dict() has, derived figures included
        return f"OffloadStats({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def __str__(self) -> str:  # every entry of as_dict(), for people: "requests 24, hits 0, ..."
        def text(value) -> str:
            if isinstance(value, int):
                return f"{value:,}"
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return ", ".join(f"{name.replace('_', ' ')} {text(value)}" for name, value in self.as_dict().items())


@dataclass(eq=False)
class _Slot:
    memory: Tensor  # this slot's bytes in the pool
    key: tuple[int, int] | None = None  # (layer, expert) held or being loaded
    pending: Future | None = None  # the load in flight, if any
    prefetched: bool = False  # loaded on a prefetch guess and not asked for yet
    last_use: int = -1
    released: object = None  # GPU: event after the last compute that read this slot


class ExpertCache:
    def __init__(self, store, layouts: list[ExpertLayout], num_experts: list[int], *, num_slots: int,
                 slot_bytes: int, device: torch.device, prefetch: bool) -> None:
        self.store, self.layouts, self.device = store, layouts, device
        pool = torch.empty(num_slots * slot_bytes, dtype=torch.uint8, device=device)
        self.slots = [_Slot(pool[i * slot_bytes: (i + 1) * slot_bytes]) for i in range(num_slots)]
        self._where: dict[tuple[int, int], _Slot] = {}
        self._scores = [[0.0] * E for E in num_experts]
        self._experts_used = list(num_experts)  # per layer, in its last call; before any, all of them
        self._successor: dict[int, int] = {}  # layer -> the layer that ran after it last time
        self._last_layer: int | None = None
        self._loader = ThreadPoolExecutor(1, thread_name_prefix=LOADER_THREAD_PREFIX) if prefetch else None
        self._copy_stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None
        self._tick = 0
        self.reset_stats()
        weakref.finalize(self, _shut_down, self._loader, store)  # the loader thread and open files go with the cache

    @property
    def prefetch(self) -> bool:
        return self._loader is not None

    def reset_stats(self) -> None:
        self._counts = dict.fromkeys(
            ("requests", "hits", "prefetch_hits", "misses", "loads", "prefetch_loads", "evictions", "bytes_moved"), 0
        )
        self._wait = 0.0
        self._tokens = [0] * len(self.layouts)

    def count_tokens(self, layer: int, tokens: int) -> None:
        """Token rows entering ``layer`` (for bytes moved per token)."""
        self._tokens[layer] += tokens

    def stats(self) -> OffloadStats:
        return OffloadStats(**self._counts, wait_seconds=self._wait, tokens=max(self._tokens, default=0),
                            num_slots=len(self.slots), slot_bytes=self.slots[0].memory.numel() if self.slots else 0)

    def run_layer(self, layer: int, tokens_per_expert: list[int], compute: Callable[[int, dict[str, Tensor]], None]) -> None:
        """Call ``compute(expert, weights)`` for every expert of ``layer`` with tokens, each with
        its weights resident, in the order they become available."""
        remaining = [e for e, n in enumerate(tokens_per_expert) if n]
        self._count_requests(layer, remaining)
        self._update_scores(layer, tokens_per_expert)
        if self._last_layer is not None:
            self._successor[self._last_layer] = layer
        self._last_layer = layer
        next_layer = self._successor.get(layer, (layer + 1) % len(self.layouts))
        if self.prefetch:
            self._load_ahead(layer, remaining)
            self._prefetch(next_layer, len(self.slots) - len(remaining), protected={(layer, e) for e in remaining})
        while remaining:
            expert = self._next(layer, remaining)
            remaining.remove(expert)
            slot = self._acquire(layer, expert, protected={(layer, e) for e in remaining})
            if self.prefetch:  # queue the next loads before computing this one
                self._load_ahead(layer, remaining, busy=slot)
            compute(expert, self.layouts[layer].views(slot.memory))
            self._release(slot)
        if self.prefetch:  # the whole pool is free for the next layer now
            self._prefetch(next_layer, len(self.slots), protected=set())

    def _count_requests(self, layer: int, experts: list[int]) -> None:
        """Hit, prefetch hit or miss, by what the cache held when the layer asked (before any load
        for this call: a load issued now for this layer is a miss however early it starts)."""
        self._counts["requests"] += len(experts)
        for e in experts:
            slot = self._where.get((layer, e))
            kind = "misses" if slot is None else "prefetch_hits" if slot.prefetched else "hits"
            self._counts[kind] += 1
            if slot is not None:
                slot.prefetched = False

    # -- choosing what to compute, load and evict --------------------------------------------

    def _next(self, layer: int, remaining: list[int]) -> int:
        """A resident expert first, then the earliest load in flight, then any."""
        in_flight = []
        for e in remaining:
            slot = self._where.get((layer, e))
            if slot is not None and (slot.pending is None or slot.pending.done()):
                return e
            if slot is not None:
                in_flight.append((slot.last_use, e))
        return min(in_flight)[1] if in_flight else remaining[0]

    def _victim(self, protected: set, busy: _Slot | None = None, wait: bool = True, by_score: bool = False) -> _Slot | None:
        """The slot to load into: a free one, else among those that hold nothing protected and are
        not loading, the least recently used (``by_score``: the least likely to be used again).
        ``wait``: if every candidate is loading, wait for one."""
        def rank(slot: _Slot):
            return (self._score(slot.key), slot.last_use) if by_score else slot.last_use

        while True:
            loading, best = [], None
            for slot in self.slots:
                if slot is busy or slot.key in protected:
                    continue
                if slot.pending is not None and not slot.pending.done():
                    loading.append(slot)
                elif slot.key is None:
                    return slot
                elif best is None or rank(slot) < rank(best):
                    best = slot
            if best is not None or not wait or not loading:
                return best
            self._wait_for(loading[0])

    def _acquire(self, layer: int, expert: int, protected: set) -> _Slot:
        key = (layer, expert)
        slot = self._where.get(key)
        if slot is not None:
            self._wait_for(slot)
        else:
            slot = self._victim(protected)
            if slot is None:  # cannot happen while every computed slot is released: a bug, not bad input
                raise RuntimeError(f"moefx offload: no slot free for expert {expert} of layer {layer}")
            self._start_load(slot, key, guess=False)
            self._wait_for(slot)
        self._tick += 1
        slot.last_use = self._tick
        return slot

    def _release(self, slot: _Slot) -> None:
        if self._copy_stream is not None:  # a later copy into this slot waits for this compute
            slot.released = torch.cuda.current_stream(self.device).record_event()

    def _load_ahead(self, layer: int, experts: list[int], busy: _Slot | None = None) -> None:
        """Queue loads of ``layer``'s ``experts`` that are not resident, into slots free to take them
        (never one holding another of them, nor ``busy``)."""
        protected = {(layer, e) for e in experts}
        for e in experts:
            if (layer, e) in self._where:
                continue
            slot = self._victim(protected, busy, wait=False)
            if slot is None:
                return
            self._start_load(slot, (layer, e), guess=False)  # asked for already: a miss's load, started early

    def _prefetch(self, layer: int, room: int, protected: set) -> None:
        """Queue loads of up to ``room`` experts ``layer`` most likely needs next. A prefetch takes
        a free slot, or evicts the resident expert least likely to be used again (by its own
        layer's routing average), and only if that one is less likely than the expert coming in:
        a guess must not push out a better one."""
        scores = self._scores[layer]
        room = min(room, self._experts_used[layer])  # as many as it used last time: more would be wasted guesses
        likely = sorted(range(len(scores)), key=lambda e: -scores[e])[:max(room, 0)]
        keep = protected | {(layer, e) for e in likely}
        for e in likely:
            if (layer, e) in self._where:
                continue
            slot = self._victim(keep, wait=False, by_score=True)
            if slot is None or (slot.key is not None and self._score(slot.key) >= scores[e]):
                return
            self._start_load(slot, (layer, e), guess=True)

    def _score(self, key: tuple[int, int]) -> float:
        return self._scores[key[0]][key[1]]

    def _update_scores(self, layer: int, tokens_per_expert: list[int]) -> None:
        self._experts_used[layer] = sum(n > 0 for n in tokens_per_expert)
        total = sum(tokens_per_expert) or 1
        self._scores[layer] = [
            _SCORE_DECAY * s + (1 - _SCORE_DECAY) * n / total for s, n in zip(self._scores[layer], tokens_per_expert)
        ]

    # -- moving bytes ------------------------------------------------------------------------

    def _start_load(self, slot: _Slot, key: tuple[int, int], *, guess: bool) -> None:
        if slot.key is not None:
            del self._where[slot.key]
            self._counts["evictions"] += 1
        slot.key, slot.prefetched = key, guess
        self._where[key] = slot
        self._counts["loads"] += 1
        self._counts["prefetch_loads"] += int(guess)
        self._counts["bytes_moved"] += self.layouts[key[0]].nbytes
        self._tick += 1
        slot.last_use = self._tick
        if self._loader is None:
            started = time.perf_counter()
            try:
                self._fill(slot, key, None)
            except BaseException:
                self._forget(slot)
                raise
            self._wait += time.perf_counter() - started
        else:
            slot.pending = self._loader.submit(self._fill, slot, key, slot.released)

    def _fill(self, slot: _Slot, key: tuple[int, int], released) -> None:
        """Copy one expert into a slot (on the loader thread, when there is one)."""
        if self.device.type != "cuda":
            self.store.read_into(*key, slot.memory)
            return
        stream = self._copy_stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            if released is not None:
                stream.wait_event(released)
            self.store.read_into(*key, slot.memory)
        stream.synchronize()  # the slot is complete (and a staging buffer reusable) when this returns

    def _wait_for(self, slot: _Slot) -> None:
        if slot.pending is None:
            return
        started = time.perf_counter()
        try:
            slot.pending.result()
        except BaseException:
            self._forget(slot)
            raise
        finally:
            self._wait += time.perf_counter() - started
        slot.pending = None

    def _forget(self, slot: _Slot) -> None:
        """A failed load: the slot holds nothing usable."""
        if slot.key is not None:
            self._where.pop(slot.key, None)
        slot.key, slot.pending, slot.prefetched = None, None, False


def _shut_down(loader: ThreadPoolExecutor | None, store) -> None:
    try:
        if loader is not None:
            # The cache's last reference may go with the loader's last job, which runs this on the
            # loader thread: that thread cannot wait for itself (and no other job is left).
            on_loader = threading.current_thread().name.startswith(LOADER_THREAD_PREFIX)
            loader.shutdown(wait=not on_loader)
    finally:
        store.close()
