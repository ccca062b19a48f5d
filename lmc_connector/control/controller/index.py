"""The controller's chunk index: which worker holds which chunk hash in which location.

Per instance, one dict maps a chunk hash to a small bitmask with one bit per
(rank, location slot). Small masks are CPython's cached ints, so an entry
costs the key object plus its dict slot (about 100 bytes), which is what
lets one controller index millions of chunks. The whole index holds at most
`capacity` distinct (instance, hash) entries: past it, new hashes are left
out (lookups miss them, which is always safe) until evictions make room. Not
thread-safe: the owning `Controller` serialises access.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lmc_connector.tokens import ChunkKey

#: Location bits per rank. Workers have two tiers (CPU, disk); four leaves room
#: while 8 ranks x 4 slots keeps every mask a single 30-bit int digit.
LOCATION_SLOTS = 4
#: Entries the index holds by default (`--max-indexed-chunks`): about 1 GB at ~100 bytes each.
DEFAULT_CAPACITY = 10_000_000


class IndexFullError(ValueError):
    """An instance reported more locations than the index has slots for; fix the worker config."""


class _InstanceIndex:
    __slots__ = ("chunks", "counts", "slots")

    def __init__(self) -> None:
        self.chunks: dict[ChunkKey, int] = {}
        self.slots: dict[str, int] = {}
        #: chunks held per bit index (rank * LOCATION_SLOTS + slot)
        self.counts: dict[int, int] = {}

    def slot(self, location: str) -> int:
        slot = self.slots.get(location)
        if slot is None:
            if len(self.slots) >= LOCATION_SLOTS:
                raise IndexFullError(
                    f"location '{location}' exceeds the {LOCATION_SLOTS} locations an instance "
                    f"may have (known: {', '.join(self.slots)})"
                )
            slot = self.slots[location] = len(self.slots)
        return slot


class ChunkIndex:
    """Owns, per instance, which (rank, location) holds each chunk hash, and counts per bit;
    at most `capacity` entries over all instances.

    Not thread-safe: the owning `ControllerState` serialises access.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity={capacity} must be positive")
        self.capacity = capacity
        self._instances: dict[str, _InstanceIndex] = {}
        self._entries = 0

    def _get(self, instance_id: str) -> _InstanceIndex:
        index = self._instances.get(instance_id)
        if index is None:
            index = self._instances[instance_id] = _InstanceIndex()
        return index

    def declare(self, instance_id: str, locations: Iterable[str]) -> None:
        """Give each location of a registering worker its slot (raises IndexFullError)."""
        index = self._get(instance_id)
        for location in locations:
            index.slot(location)

    def admit(self, instance_id: str, rank: int, location: str, keys: Sequence[ChunkKey]) -> int:
        """Mark `keys` as held; returns how many were left out because the index is full."""
        index = self._get(instance_id)
        bit_index = rank * LOCATION_SLOTS + index.slot(location)
        bit = 1 << bit_index
        chunks = index.chunks
        get = chunks.get
        entries = len(chunks)
        room = self.capacity - self._entries
        added = left_out = 0
        if len(keys) <= room:  # the usual case: no entry to count on the way
            for key in keys:
                mask = get(key, 0)
                if not mask & bit:
                    chunks[key] = mask | bit
                    added += 1
        else:
            for key in keys:
                mask = get(key, 0)
                if mask & bit:
                    continue
                if not mask and len(chunks) - entries == room:
                    left_out += 1
                    continue
                chunks[key] = mask | bit
                added += 1
        self._entries += len(chunks) - entries
        index.counts[bit_index] = index.counts.get(bit_index, 0) + added
        return left_out

    def evict(self, instance_id: str, rank: int, location: str, keys: Sequence[ChunkKey]) -> int:
        """Mark `keys` as gone; returns how many were held."""
        index = self._get(instance_id)
        bit_index = rank * LOCATION_SLOTS + index.slot(location)
        bit = 1 << bit_index
        chunks = index.chunks
        removed = 0
        for key in keys:
            mask = chunks.get(key)
            if mask is not None and mask & bit:
                mask &= ~bit
                if mask:
                    chunks[key] = mask
                else:
                    del chunks[key]
                    self._entries -= 1
                removed += 1
        index.counts[bit_index] = index.counts.get(bit_index, 0) - removed
        return removed

    def drop_worker(self, instance_id: str, rank: int) -> None:
        """Forget every chunk of one worker (all its locations)."""
        index = self._instances.get(instance_id)
        if index is None:
            return
        worker_bits = ((1 << LOCATION_SLOTS) - 1) << (rank * LOCATION_SLOTS)
        chunks = index.chunks
        for key in [k for k, mask in chunks.items() if mask & worker_bits]:
            mask = chunks[key] & ~worker_bits
            if mask:
                chunks[key] = mask
            else:
                del chunks[key]
                self._entries -= 1
        for slot in range(LOCATION_SLOTS):
            index.counts.pop(rank * LOCATION_SLOTS + slot, None)

    def drop_instance(self, instance_id: str) -> None:
        index = self._instances.pop(instance_id, None)
        if index is not None:
            self._entries -= len(index.chunks)

    def __contains__(self, instance_id: object) -> bool:
        """Whether anything is indexed (or declared) for `instance_id`."""
        return instance_id in self._instances

    def count(self, instance_id: str, rank: int, location: str) -> int:
        index = self._instances.get(instance_id)
        if index is None or location not in index.slots:
            return 0
        return index.counts.get(rank * LOCATION_SLOTS + index.slots[location], 0)

    def size(self, instance_id: str | None = None) -> int:
        """Distinct chunk hashes indexed (for one instance, or summed over all)."""
        if instance_id is not None:
            index = self._instances.get(instance_id)
            return 0 if index is None else len(index.chunks)
        return self._entries

    def prefix(
        self,
        instance_id: str,
        keys: Sequence[ChunkKey],
        ranks: Iterable[int],
        location: str | None = None,
    ) -> tuple[str, int] | None:
        """The location where every one of `ranks` holds the longest prefix of `keys`
        (only `location` when given).

        Returns (location, chunks) or None when no location holds the first chunk.
        Ties go to the location registered first (the CPU tier before disk).
        """
        index = self._instances.get(instance_id)
        if index is None or not keys:
            return None
        rank_list = list(ranks)
        get = index.chunks.get
        best: tuple[str, int] | None = None
        slots = [(n, s) for n, s in index.slots.items() if location in (None, n)]
        for name, slot in slots:
            need = sum(1 << (r * LOCATION_SLOTS + slot) for r in rank_list)
            held = 0
            for key in keys:
                if get(key, 0) & need != need:
                    break
                held += 1
            if held and (best is None or held > best[1]):
                best = (name, held)
        return best
