"""The statistics protocol between processes: which rank solves each layer group, how a task's finished
statistics reach it (summed over ranks, sent whole by the rank that captured the task, or sent in shares
and summed where solved), and how every solution reaches every rank.

What travels for one group, in a fixed order: the Gram's upper block triangle packed (``pack_gram``), the
cross term where it is needed whole, the projected cross terms, then one float64 tensor of scalars
(tokens, ||X^T Xh||, output norms). ``ranks.Ranks`` moves the tensors.
"""

from __future__ import annotations

import torch

from ..errors import IterisError
from .capture import StatsCollector
from .layers import LayerGroup
from .stats import GroupStats, add_shares, pack_gram, packed_size, unpack_gram


class StatsExchange:
    """One sweep's traffic of statistics between ranks, attached to the collector (``collector.exchange``)."""

    def __init__(self, ranks, collector: StatsCollector):
        self.ranks = ranks
        self.collector = collector
        collector.exchange = self
        self.owner: dict[str, int] = {}  # group -> the rank that solves it
        self.in_flight: list = []  # statistics sent or being received: Ranks.settle before they are used
        self.received: list[GroupStats] = []  # statistics that arrive (or are summed) only once settled

    # ------------------------------------------------------------------------------------ who solves what

    def assign(self, groups: list[LayerGroup]) -> None:
        """Which rank solves (and so receives the statistics of) each group, balanced by the cost of its
        solves (members x d_in^3)."""
        self.owner = self.ranks.owners({g.name: len(g.members) * g.in_features**3 for g in groups})

    def mine(self, stage: list[LayerGroup], owners: dict[str, int] | None = None) -> list[str]:
        """The stage's layers this rank solves; ``owners`` collects who solves each layer."""
        owner = {m: self.owner[g.name] for g in stage for m in g.members}
        if owners is not None:
            owners.update(owner)
        return [m for m in owner if owner[m] == self.ranks.rank]

    def share(self, solved: dict, owners: dict[str, int], groups: list[LayerGroup]) -> dict:
        """Every layer's solution on every rank, from the one that solved it."""
        order = [m for g in groups for m in g.members if m in owners]
        return self.ranks.share(solved, owners, order, lambda name: self.collector.layers[name].weight.device)

    def take_in_flight(self) -> list:
        out, self.in_flight = self.in_flight, []
        return out

    def take_received(self) -> list[GroupStats]:
        out, self.received = self.received, []
        return out

    # ------------------------------------------------------------------------------ one task's statistics

    def sum_over_ranks(self, stats: dict[str, GroupStats]) -> None:
        """The raw sums (Grams, cross terms, projected cross terms, output norms, token counts) over all
        ranks, before anything is derived from them; every rank gathered the same groups."""
        c = self.collector
        if c.parts:
            raise IterisError("inputs kept for a sample-space solve cannot be summed over processes")
        for g in sorted(stats):  # one group at a time: one packed copy of a Gram alive
            st = stats[g]
            tokens = torch.tensor([float(st.tokens)], dtype=torch.float64, device=st.gram.device)
            out_norms = [c.out_sq[n] for n in sorted(c.out_sq) if c.group_of[n] == g]
            # of the Gram only the blocks computed so far (add_gram's upper triangle: mirrored once summed)
            packed = pack_gram(st.gram)
            self.ranks.sum_to({self.owner[g]: [packed] + [t for t in (st.cross, st.proj.get("")) if t is not None]
                               + out_norms + [tokens]})
            if self.owner[g] != self.ranks.rank:  # another rank solves this group: its partial sums are not needed
                del stats[g]
                for n in [n for n in c.out_sq if c.group_of[n] == g]:
                    del c.out_sq[n]
            else:
                if packed.data_ptr() != st.gram.data_ptr():
                    unpack_gram(packed, st.gram.shape[0], into=st.gram)
                st.tokens = tokens[0]  # a 0-dim tensor: read (a host sync) only where solved

    def sum_shares_where_solved(self, stats: dict[str, GroupStats], holders: tuple[int, ...]) -> None:
        """A task captured in shares by several ranks: each share's statistics (cross term still whole) sent to
        the rank solving the group, summed there after arrival, then its cross term's norm taken."""
        c = self.collector
        me = self.ranks.rank
        sends, recvs, sums = [], [], []
        for name in sorted(c.active):
            owner = self.owner[name]
            if me in holders and me != owner:
                sends += [(t, owner) for t in self._wire(stats.pop(name), name, share=True)]
            elif me == owner:
                parts = []
                for peer in holders:
                    if peer == me:
                        continue
                    part = c.blank()
                    wire = self._wire(part, name, blank=True, share=True)
                    recvs += [(t, peer) for t in wire]
                    parts.append((part, wire[-1]))
                mine = stats.get(name)
                target = mine if mine is not None else c.blank()
                stats[name] = target
                self.received.append(target)
                members = c.group_by_name[name].members
                sums.append(lambda t=target, m=mine, p=parts, ms=members, spec=c.spec: add_shares(t, m, p, ms, spec))
        self.in_flight += self.ranks.exchange(sends, recvs) + sums

    def pass_to_owners(self, stats: dict[str, GroupStats], holder: int) -> None:
        """A task captured whole on rank ``holder``: each of its groups' finished statistics sent to the rank
        that solves the group (and dropped here), received there into statistics of the same layout."""
        c = self.collector
        me = self.ranks.rank
        sends, recvs, received = [], [], []
        for name in sorted(c.active):
            owner = self.owner[name]
            if owner == holder:
                continue
            if me == holder:
                sends += [(t, owner) for t in self._wire(stats.pop(name), name)]
            elif me == owner:
                st = c.blank()
                stats[name] = st
                wire = self._wire(st, name, blank=True)
                recvs += [(t, holder) for t in wire]
                received.append((st, name, wire[-1]))
        self.in_flight += self.ranks.exchange(sends, recvs)
        self.received += [st for st, _, _ in received]
        for st, name, scalars in received:  # kept as 0-dim tensors: read (a host sync) only where solved
            st.tokens, rest = scalars[0], list(scalars[1:])
            if c.spec.wants_cross_norm:
                st.cross_norm = rest.pop(0)
            if c.spec.out_norms:
                st.out_sq = dict(zip(c.group_by_name[name].members, rest))

    def _wire(self, st: GroupStats, name: str, blank: bool = False, share: bool = False) -> list[torch.Tensor]:
        """A finished group's statistics as the tensors that travel, in a fixed order; ``blank``: empty ones of
        that layout (set on ``st``) to receive into. The scalars (tokens, ||X^T Xh||, output norms) go as one.
        ``share``: one share of a task's samples: the cross term travels whole (its norm is taken of the sum)."""
        c = self.collector
        spec = c.spec
        group = c.group_by_name[name]
        device = c.device_of(name)
        d, dtype = group.in_features, c.stats_dtype
        # (an unpaired sweep's cross term is its Gram)
        cross = (spec.wants_cross_norm if share else spec.keeps_cross) and spec.paired
        norm = spec.wants_cross_norm and not share
        if blank:  # the Gram arrives packed, and is unpacked where it is solved (full_gram)
            st.packed = torch.empty(packed_size(d), dtype=dtype, device=device)
            st.packed_dim = d
            if cross:
                st.cross = torch.empty(d, d, dtype=dtype, device=device)
            if name in c.projections:
                members, ranks = c.projections[name][:2]
                st.proj = {m: torch.empty(r, d, dtype=dtype, device=device) for m, r in zip(members, ranks)}
        n_scalars = 1 + norm + (len(group.members) if spec.out_norms else 0)
        if blank:
            scalars = torch.empty(n_scalars, dtype=torch.float64, device=device)
        else:
            values = [torch.tensor(float(st.tokens), dtype=torch.float64, device=device)]
            if norm:
                values.append(st.cross_norm.to(device=device, dtype=torch.float64).reshape(()))
            if spec.out_norms:
                values += [torch.tensor(st.out_sq[m], dtype=torch.float64, device=device) for m in group.members]
            scalars = torch.stack(values)
        tensors = [st.packed if blank else pack_gram(st.gram)] + ([st.cross] if cross else []) + list(st.proj.values())
        return [t if t.dtype == dtype else t.to(dtype) for t in tensors] + [scalars]
