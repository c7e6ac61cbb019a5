"""Row blocks for inference whose per-row results do not depend on the block.

BLAS chooses its matrix-multiply kernel by shape, and for a handful of rows
it uses kernels that round differently from the many-row ones. Seen with MKL
on an AMD EPYC host: a block of 1-3 rows on one thread, and of up to 11 rows
on two, gave other float32 bits than the same rows inside a large block. A
row's code, score or explanation would then depend on how many rows share its
block, and a run split into Dask units, or into batches of another size,
would not reproduce the single pass row for row.

So no inference block is small: a short remainder joins the block before it
(:func:`row_blocks`), and an input that is short as a whole is padded with
zero rows (:func:`padded`), whose results are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

#: Fewest rows a matrix multiply at inference runs on. Far above the sizes
#: seen to change kernels (11 rows on two threads), so that hosts with more
#: threads splitting the rows also stay on the many-row kernels.
MIN_BLOCK_ROWS = 256


def row_blocks(n: int, step: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``, ``step`` rows each, except
    that a last remainder under :data:`MIN_BLOCK_ROWS` joins the block before
    it (so a block holds at most ``step + MIN_BLOCK_ROWS - 1`` rows)."""
    start = 0
    while start < n:
        stop = min(start + step, n)
        if n - stop < MIN_BLOCK_ROWS:
            stop = n
        yield slice(start, stop)
        start = stop


def padded(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (m, ...) with zero rows appended up to :data:`MIN_BLOCK_ROWS`;
    ``rows`` itself when it has that many. Results of the first m rows are the
    ones a large block gives them."""
    m = rows.shape[0]
    if m >= MIN_BLOCK_ROWS:
        return rows
    return torch.cat([rows, rows.new_zeros((MIN_BLOCK_ROWS - m, *rows.shape[1:]))])
