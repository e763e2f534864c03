"""The engine's running decode groups: requests of one batch key (same mode and block shape) share
one decode batch, whose decoder plans one pass over all its rows.

A group holds at most `cap` rows (the step's token budget over the pass's width), so no pass feeds
more than a step's worth of tokens; rows past that form further groups of the same key, which ride
together again once their rows fit one step (`Scheduler.schedule`). Groups take turns by forward
time per row (`vtime`): the one that has had the least leads the next step, so every row gets an
equal share of forward time whatever its mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trimode.decoding.base import DecodeBatch, Decoder
from trimode.engine.request import Request, set_remaining


@dataclass
class Group:
    decoder: Decoder
    batch: DecodeBatch
    requests: list[Request] = field(default_factory=list)
    vtime: float = 0.0  # forward seconds spent per row so far: the group with the least goes next


class Groups(dict[tuple, Group]):
    """Group key -> group; a key is (batch key, shard number)."""

    def add(self, key: tuple, decoder: Decoder, batch: DecodeBatch, requests: list[Request], cap: int) -> None:
        """`batch`'s rows (`requests`, freshly prefilled, of batch key `key`) join the groups of that
        key with room, at most `cap` rows to a group; the rest start new groups."""
        pieces = [list(range(i, min(i + cap, batch.size))) for i in range(0, batch.size, cap)]
        for rows, part in zip(pieces, batch.split(pieces)):
            reqs = [requests[i] for i in rows]
            room = [k for k, g in self.items() if k[0] == key and len(g.requests) + len(rows) <= cap]
            if room:
                self[room[0]].batch.extend(part)
                self[room[0]].requests += reqs
            else:
                # A new group starts level with the others, neither owed time nor behind.
                vtime = min((g.vtime for g in self.values()), default=0.0)
                shard = next(n for n in range(len(self) + 1) if (key, n) not in self)
                self[(key, shard)] = Group(decoder, part, reqs, vtime)

    def drop_row(self, key: tuple, row: int) -> None:
        """Row `row` leaves group `key` (its pages return to the pool); an empty group ends."""
        group = self[key]
        keep = [j for j in range(len(group.requests)) if j != row]
        group.requests = [group.requests[j] for j in keep]
        group.batch.select_rows(keep)
        set_remaining(group.batch, group.requests)
        if not keep:
            del self[key]

    def find(self, request_id: str) -> tuple[tuple, int] | None:
        """(group key, row) of a running request, or None."""
        for key, group in self.items():
            for row, req in enumerate(group.requests):
                if req.request_id == request_id:
                    return key, row
        return None

    def charge(self, rows: list[tuple[tuple, int]], seconds: float) -> None:
        """A forward of `seconds` ran these (group key, rows it had) parts."""
        for key, n in rows:
            if key in self:
                self[key].vtime += seconds / n
