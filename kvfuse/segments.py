"""Segment graphs: which token may see which.

A composed sequence is a list of *segments* (contiguous runs of tokens of one origin: the shared
prefix, a thread, the continuation after a merge, an inserted memory block) laid out one after the
other in the order given. A token sees

* every token of every ancestor of its segment (parents, their parents, ...), and
* the causal past inside its own segment (itself included).

Fork = several segments with the same parent; join = a segment with several parents.

Every segment also has RoPE positions: its tokens sit at ``position, position + 1, ...``
(``position=None``: where the segment starts in the token order). Positions do not change what a
token sees, except under a sliding window: with ``window=W`` a query at position ``p`` sees only the
keys (among those above) at positions ``> p - W``, as Hugging Face's sliding-window layers do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Segment:
    """One contiguous run of tokens.

    Args:
        name: unique name within its graph.
        length: number of tokens (0 allowed: an empty thread).
        parents: names of the segments this one sees entirely.
        position: RoPE position of its first token (the others follow by one); ``None``: its start in
            the token order. Only a sliding window (``window=``) reads it.
    """

    name: str
    length: int
    parents: tuple[str, ...] = ()
    position: int | None = None

    def __post_init__(self):
        if isinstance(self.parents, str):
            raise TypeError(f"Segment {self.name!r}: parents must be a tuple of names, got the string "
                            f"{self.parents!r} (write ({self.parents!r},))")
        object.__setattr__(self, "parents", tuple(self.parents))
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 0:
            raise ValueError(f"Segment {self.name!r}: length must be an int >= 0, got {self.length!r}")
        if self.position is not None and (not isinstance(self.position, int) or isinstance(self.position, bool)
                                          or self.position < 0):
            raise ValueError(f"Segment {self.name!r}: position must be None or an int >= 0, got {self.position!r}")


def _ancestors(parents: list[list[int]], names: list[str]) -> torch.Tensor:
    """bool [S, S] transitive closure of the parent lists, in topological order with one bitset (a
    Python int) per segment: O(edges) bitset unions instead of matrix products, so a sequence with
    a thousand segments (many fork / merge rounds) builds its graph in milliseconds."""
    n = len(parents)
    children = [[] for _ in range(n)]
    pending = [len(set(ps)) for ps in parents]
    for i, ps in enumerate(parents):
        for p in set(ps):
            children[p].append(i)
    ready = [i for i in range(n) if pending[i] == 0]
    bits = [0] * n
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        b = 0
        for p in parents[i]:
            b |= bits[p] | (1 << p)
        bits[i] = b
        for c in children[i]:
            pending[c] -= 1
            if pending[c] == 0:
                ready.append(c)
    if done < n:
        cyc = [names[i] for i in range(n) if pending[i] > 0]
        raise ValueError(f"SegmentGraph: the parents form a cycle through {cyc}")
    width = (n + 7) // 8
    packed = np.frombuffer(b"".join(b.to_bytes(width, "little") for b in bits), dtype=np.uint8).reshape(n, width)
    return torch.from_numpy(np.unpackbits(packed, axis=1, bitorder="little")[:, :n].astype(bool))


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
        anc = _ancestors([[index[p] for p in s.parents] for s in segments], names)
        self.ancestors = anc  # [S, S] bool: ancestors[i, j] = segment j is an ancestor of segment i
        lengths = torch.tensor([s.length for s in segments], dtype=torch.int64)
        self.lengths = lengths
        self.starts = torch.cumsum(lengths, 0) - lengths
        self.num_tokens = int(lengths.sum())
        # [S] int64: RoPE position of each segment's first token
        pos = [st if s.position is None else s.position for s, st in zip(segments, self.starts.tolist())]
        self.positions = torch.tensor(pos, dtype=torch.int64)
        # what a plan depends on (names do not matter): graphs of equal keys share their plan rows
        self.shape_key = tuple((s.length, tuple(index[p] for p in s.parents), q) for s, q in zip(segments, pos))

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def token_range(self, name: str) -> tuple[int, int]:
        i = self.index[name]
        return int(self.starts[i]), int(self.starts[i] + self.lengths[i])

    def token_segments(self) -> torch.Tensor:
        """int32 [num_tokens]: segment index of every token."""
        return torch.repeat_interleave(torch.arange(self.num_segments, dtype=torch.int32), self.lengths)

    def token_positions(self) -> torch.Tensor:
        """int64 [num_tokens]: RoPE position of every token (its segment's first position, plus its
        offset in the segment)."""
        return torch.repeat_interleave(self.positions - self.starts, self.lengths) + torch.arange(self.num_tokens)

    def dense_mask(self, q_tokens: torch.Tensor | None = None, k_tokens: torch.Tensor | None = None, *,
                   window: int | None = None):
        """bool [len(q_tokens), len(k_tokens)]: may query token i see key token j (token indices in
        the composed order; all tokens by default), with an optional sliding ``window`` over
        positions. The reference definition of the mask."""
        seg = self.token_segments().long()
        q = torch.arange(self.num_tokens) if q_tokens is None else q_tokens.long().cpu()
        k = torch.arange(self.num_tokens) if k_tokens is None else k_tokens.long().cpu()
        qs, ks = seg[q], seg[k]
        mask = self.ancestors[qs[:, None], ks[None, :]] | ((qs[:, None] == ks[None, :]) & (k[None, :] <= q[:, None]))
        if window is not None:
            pos = self.token_positions()
            mask &= (pos[q][:, None] - pos[k][None, :]) < window
        return mask

    def visible_pairs(self, q_len: int | None = None, *, q_tokens: torch.Tensor | None = None,
                      window: int | None = None) -> int:
        """Number of visible (query, key) pairs when the last ``q_len`` tokens (or the tokens
        ``q_tokens``) are the queries, under an optional sliding ``window``."""
        if q_tokens is None:
            q_len = self.num_tokens if q_len is None else q_len
            q = torch.arange(self.num_tokens - q_len, self.num_tokens)
        else:
            q = q_tokens.long().cpu()
        seg = self.token_segments().long()
        qs = seg[q]
        own = q - self.starts[qs] + 1  # causal past inside the own segment, itself included
        if window is None:
            anc_tokens = (self.ancestors.long() * self.lengths[None, :]).sum(1)  # [S]
            return int((anc_tokens[qs] + own).sum())
        pos = self.positions[qs] + q - self.starts[qs]  # [Q]
        lo = pos[:, None] - window + 1  # lowest visible key position
        first, end = self.positions[None, :], self.positions[None, :] + self.lengths[None, :]
        per_seg = (end - torch.maximum(first, lo)).clamp(min=0).clamp(max=self.lengths[None, :])
        anc = (self.ancestors[qs].long() * per_seg).sum(1)
        own = torch.minimum(own, torch.full_like(own, window))
        return int((anc + own).sum())

    @classmethod
    def fork_join(cls, prefix: int, threads: Sequence[int], join: int = 0) -> SegmentGraph:
        """Prefix, threads that each see the prefix, and an optional join that sees everything."""
        segs = [Segment("prefix", prefix)]
        segs += [Segment(f"thread{i}", n, ("prefix",)) for i, n in enumerate(threads)]
        if join:
            segs.append(Segment("join", join, tuple(f"thread{i}" for i in range(len(threads))) + ("prefix",)))
        return cls(segs)

    def __repr__(self):
        parts = ", ".join(f"{s.name}[{s.length}]<-{list(s.parents)}" + ("" if s.position is None else f"@{s.position}")
                          for s in self.segments)
        return f"SegmentGraph({parts})"
