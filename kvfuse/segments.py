"""Segment graphs: which token may see which.

A composed sequence is a list of *segments* (contiguous runs of tokens of one origin: the shared
prefix, a thread, the continuation after a merge, an inserted memory block) laid out one after the
other in the order given. A token sees

* every token of every ancestor of its segment (parents, their parents, ...), and
* the causal past inside its own segment (itself included).

Fork = several segments with the same parent; join = a segment with several parents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Segment:
    """One contiguous run of tokens.

    Args:
        name: unique name within its graph.
        length: number of tokens (0 allowed: an empty thread).
        parents: names of the segments this one sees entirely.
    """

    name: str
    length: int
    parents: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.parents, str):
            raise TypeError(f"Segment {self.name!r}: parents must be a tuple of names, got the string "
                            f"{self.parents!r} (write ({self.parents!r},))")
        object.__setattr__(self, "parents", tuple(self.parents))
        if not isinstance(self.length, int) or self.length < 0:
            raise ValueError(f"Segment {self.name!r}: length must be an int >= 0, got {self.length!r}")


class SegmentGraph:
    """A DAG over segments laid out in the given token order.

    Example:
        >>> g = SegmentGraph([Segment("p", 4), Segment("a", 3, ("p",)), Segment("b", 2, ("p",)),
        ...                   Segment("join", 2, ("a", "b"))])
        >>> g.num_tokens
        11
        >>> bool(g.dense_mask()[7, 4])  # first token of b does not see a
        False
    """

    def __init__(self, segments: Sequence[Segment]):
        segments = list(segments)
        if not segments:
            raise ValueError("SegmentGraph: segments must not be empty")
        names = [s.name for s in segments]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"SegmentGraph: duplicate segment names {dup}")
        index = {n: i for i, n in enumerate(names)}
        for s in segments:
            for p in s.parents:
                if p not in index:
                    raise ValueError(f"SegmentGraph: segment {s.name!r} has unknown parent {p!r}")
                if p == s.name:
                    raise ValueError(f"SegmentGraph: segment {s.name!r} lists itself as a parent (a cycle)")
        self.segments = segments
        self.index = index
        n = len(segments)
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i, s in enumerate(segments):
            for p in s.parents:
                anc[i, index[p]] = True
        for _ in range(n):  # transitive closure by repeated squaring-free propagation
            new = anc | ((anc.float() @ anc.float()) > 0)
            if torch.equal(new, anc):
                break
            anc = new
        if bool(anc.diagonal().any()):
            cyc = [segments[i].name for i in torch.nonzero(anc.diagonal()).flatten().tolist()]
            raise ValueError(f"SegmentGraph: the parents form a cycle through {cyc}")
        self.ancestors = anc  # [S, S] bool: ancestors[i, j] = segment j is an ancestor of segment i
        lengths = torch.tensor([s.length for s in segments], dtype=torch.int64)
        self.lengths = lengths
        self.starts = torch.cumsum(lengths, 0) - lengths
        self.num_tokens = int(lengths.sum())

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def token_range(self, name: str) -> tuple[int, int]:
        i = self.index[name]
        return int(self.starts[i]), int(self.starts[i] + self.lengths[i])

    def token_segments(self) -> torch.Tensor:
        """int32 [num_tokens]: segment index of every token."""
        return torch.repeat_interleave(torch.arange(self.num_segments, dtype=torch.int32), self.lengths)

    def dense_mask(self, q_tokens: torch.Tensor | None = None, k_tokens: torch.Tensor | None = None):
        """bool [len(q_tokens), len(k_tokens)]: may query token i see key token j (token indices in
        the composed order; all tokens by default). The reference definition of the mask."""
        seg = self.token_segments().long()
        q = torch.arange(self.num_tokens) if q_tokens is None else q_tokens.long().cpu()
        k = torch.arange(self.num_tokens) if k_tokens is None else k_tokens.long().cpu()
        qs, ks = seg[q], seg[k]
        return self.ancestors[qs[:, None], ks[None, :]] | ((qs[:, None] == ks[None, :]) & (k[None, :] <= q[:, None]))

    def visible_pairs(self, q_len: int | None = None) -> int:
        """Number of visible (query, key) pairs when the last ``q_len`` tokens are the queries."""
        q_len = self.num_tokens if q_len is None else q_len
        seg = self.token_segments().long()
        anc_tokens = (self.ancestors.long() * self.lengths[None, :]).sum(1)  # [S]
        q = torch.arange(self.num_tokens - q_len, self.num_tokens)
        qs = seg[q]
        return int((anc_tokens[qs] + (q - self.starts[qs]) + 1).sum())

    @classmethod
    def fork_join(cls, prefix: int, threads: Sequence[int], join: int = 0) -> SegmentGraph:
        """Prefix, threads that each see the prefix, and an optional join that sees everything."""
        segs = [Segment("prefix", prefix)]
        segs += [Segment(f"thread{i}", n, ("prefix",)) for i, n in enumerate(threads)]
        if join:
            segs.append(Segment("join", join, tuple(f"thread{i}" for i in range(len(threads))) + ("prefix",)))
        return cls(segs)

    def __repr__(self):
        parts = ", ".join(f"{s.name}[{s.length}]<-{list(s.parents)}" for s in self.segments)
        return f"SegmentGraph({parts})"
