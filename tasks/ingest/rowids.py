"""Row ids and duplicate keys.

``_row_id`` is a 64-bit hash of the stripped key cells (all cells when there is
no key), computed with numpy from the bytes, so it is stable across runs, row
order and library versions. Duplicate keys: the first accepted row wins (a
rejected row does not claim its key); identical keyless rows get ids salted
with their occurrence count. Dedup memory is 16 bytes per accepted row (hash
and where it was first seen), 8 without keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.ingest.problems import Problem, clip
from tasks.validate import Parsed, combine_hashes, occurrence_hash

_FILE_SHIFT = 40  # positions pack (file index, row number) into one int64


class SeenSet:
    """Hashes of accepted rows so far, with where each was first seen.

    Sorted numpy runs merged LSM-style (8 bytes per row, +8 with positions),
    never a Python object per row; a lookup is one searchsorted per run.
    """

    def __init__(self, with_positions: bool) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._with_positions = with_positions

    def lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = np.zeros(len(h), bool)
        where = np.full(len(h), -1, np.int64)
        for keys, pos in self._runs:
            i = np.minimum(np.searchsorted(keys, h), len(keys) - 1)
            hit = (keys[i] == h) & ~found
            found |= hit
            if pos is not None:
                where[hit] = pos[i[hit]]
        return found, where

    def add_sorted(self, keys: np.ndarray, pos: np.ndarray | None) -> None:
        """Add new hashes, already sorted and not yet in the set."""
        if not len(keys):
            return
        self._runs.append((keys, pos if self._with_positions else None))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(
            self._runs[-1][0]
        ):
            (k1, p1), (k2, p2) = self._runs[-2:]
            # Merge two sorted runs: where each of k2 lands among k1.
            at = np.searchsorted(k1, k2, side="right") + np.arange(len(k2))
            second = np.zeros(len(k1) + len(k2), bool)
            second[at] = True
            merged = np.empty(len(second), np.uint64)
            merged[second], merged[~second] = k2, k1
            mpos = None
            if p1 is not None and p2 is not None:
                mpos = np.empty(len(second), np.int64)
                mpos[second], mpos[~second] = p2, p1
            self._runs[-2:] = [(merged, mpos)]


_FILE_SHIFT = 40  # positions pack (file index, row number) into one int64


class RowIds:
    """Ids for each block's rows, and the duplicate keys among them, in order.

    Holds what the blocks so far have claimed: the seen-set of accepted
    hashes (with where each was first seen, for keyed tables) and, without
    keys, how often each whole row occurred.
    """

    def __init__(self, keys: Sequence[str], files: Sequence[Path]) -> None:
        self.keys = list(keys)
        self.files = list(files)
        self.seen = SeenSet(with_positions=bool(self.keys))
        self.dup_counts: dict[int, int] = {}

    def assign(
        self,
        fi: int,
        numbers: np.ndarray,
        parsed: Mapping[str, Parsed],
        hashes: np.ndarray,
        by_hash: np.ndarray,
        ok: np.ndarray,
    ) -> tuple[np.ndarray, Problem | None]:
        """Ids for all rows, and the duplicate-key problem among the ``ok`` ones.

        Works on the candidates sorted by hash (``by_hash`` sorts all rows; a
        subset of a sorted order is sorted): equal hashes are adjacent, and
        the new ones come out already sorted for the seen-set.
        """
        cand = np.flatnonzero(ok)
        order = by_hash[ok[by_hash]]
        hs = hashes[order]
        starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]]) if len(hs) else cand
        sizes = np.diff(np.r_[starts, len(hs)])
        found, where = self.seen.lookup(hs)
        if not self.keys:
            return self._keyless_ids(hashes, order, hs, starts, sizes, found), None
        earliest = (
            np.repeat(np.minimum.reduceat(order, starts), sizes) if len(hs) else order
        )
        dup = found | (order != earliest)
        new = ~dup
        self.seen.add_sorted(
            hs[new], (np.int64(fi) << _FILE_SHIFT) | numbers[order[new]]
        )
        if not dup.any():
            return hashes, None
        first_pos = np.where(
            found, where, (np.int64(fi) << _FILE_SHIFT) | numbers[earliest]
        )
        dup_rows = order[dup]
        mask = np.zeros(len(hashes), bool)
        mask[dup_rows] = True
        pos_of = dict(zip(dup_rows.tolist(), first_pos[dup].tolist(), strict=True))
        keys = self.keys

        def describe(idx: np.ndarray) -> list[str]:
            cols = [parsed[k].text.take(pa.array(idx)).to_pylist() for k in keys]
            out = []
            for j, i in enumerate(idx.tolist()):
                pos = pos_of[i]
                ffi, row = pos >> _FILE_SHIFT, pos & ((1 << _FILE_SHIFT) - 1)
                where_txt = f"row {row}" + (
                    f" of {self.files[ffi]}" if ffi != fi else ""
                )
                vals = ", ".join(clip(c[j]) for c in cols)
                out.append(
                    f"duplicate key ({', '.join(keys)}) = ({vals}) first seen at"
                    f" {where_txt}"
                )
            return out

        return hashes, Problem(mask, "duplicate key", describe)

    def _keyless_ids(
        self,
        hashes: np.ndarray,
        order: np.ndarray,
        hs: np.ndarray,
        starts: np.ndarray,
        sizes: np.ndarray,
        found: np.ndarray,
    ) -> np.ndarray:
        """Whole-row hashes; the k-th identical row (k > 0) gets a k-salted id."""
        rank = np.arange(len(hs)) - np.repeat(starts, sizes)
        prior = np.zeros(len(hs), np.int64)
        if found.any():
            prior[found] = [self.dup_counts.get(int(x), 1) for x in hs[found].tolist()]
        occ = prior + rank
        ids = hashes.copy()
        repeat = occ > 0
        if repeat.any():
            ids[order[repeat]] = occurrence_hash(hs[repeat], occ[repeat])
        self.seen.add_sorted(hs[starts][~found[starts]], None)
        totals = sizes + prior[starts]
        for s, total in zip(
            starts[totals > 1].tolist(), totals[totals > 1].tolist(), strict=True
        ):
            self.dup_counts[int(hs[s])] = total
        return ids


def sorted_hashes(
    columns: Sequence[np.ndarray], stable: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Row hashes of a block and the rows sorted by them.

    Keyed rows only need each group's earliest row (a cheaper unstable sort and
    a reduceat later); keyless copies are ranked in file order (stable sort).
    """
    hashes = combine_hashes(list(columns))
    return hashes, np.argsort(hashes, kind="stable" if stable else "quicksort")
