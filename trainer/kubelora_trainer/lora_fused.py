"""LoRA on the parts of a fused linear (q, k, v [, mlp] in one weight, as in the original Flux and
HunyuanVideo layouts) and back, exactly. Pure tensor functions.

fuse: the trained parts' A stacked and B block-diagonal, so B A restricted to part i's output
rows is B_i A_i (an untrained part's rows stay zero). split: the inverse; a B that is
block-diagonal in equal rank blocks gives each part its own A and B back, any other fused LoRA
(e.g. trained fused by sd-scripts) gives each part the shared A and its rows of B, also exact.
"""
from __future__ import annotations

import torch

Pair = tuple[torch.Tensor, torch.Tensor]


def fuse(parts: dict[int, Pair], sizes: list[int]) -> Pair:
    """parts: {slot: (A [r, in], B [out_slot, r])}; sizes: output rows of every slot."""
    ranks = {i: a.shape[0] for i, (a, _) in parts.items()}
    b_full = torch.zeros(sum(sizes), sum(ranks.values()), dtype=torch.float32)
    row = col = 0
    for i, size in enumerate(sizes):
        if i in parts:
            b = parts[i][1]
            if b.shape[0] != size:
                raise ValueError(f"part {i} of the fused linear has {b.shape[0]} output rows, expected {size}")
            b_full[row:row + size, col:col + ranks[i]] = b.float()
            col += ranks[i]
        row += size
    a = torch.cat([parts[i][0].float() for i in sorted(parts)], 0)
    return a.contiguous(), b_full.contiguous()


def split(a: torch.Tensor, b: torch.Tensor, sizes: list[int]) -> dict[int, Pair]:
    """Inverse of fuse: {slot: (A, B)} for every slot with a non-zero update (all slots when B is
    all zero, e.g. a LoRA straight from init)."""
    if any(n < 0 for n in sizes) or sum(sizes) != b.shape[0]:
        raise ValueError(f"fused LoRA B has {b.shape[0]} rows; the parts need {sum(sizes)}")
    rows = list(torch.split(b, sizes, dim=0))
    trained = [i for i, rb in enumerate(rows) if torch.count_nonzero(rb)] or list(range(len(sizes)))
    n = len(trained)
    if a.shape[0] % n == 0:
        r = a.shape[0] // n
        blocks = {i: slice(j * r, (j + 1) * r) for j, i in enumerate(trained)}
        if all(torch.count_nonzero(rows[i][:, :blocks[i].start]) == 0 and
               torch.count_nonzero(rows[i][:, blocks[i].stop:]) == 0 for i in trained):
            return {i: (a[blocks[i]].contiguous(), rows[i][:, blocks[i]].contiguous()) for i in trained}
    return {i: (a.contiguous(), rows[i].contiguous()) for i in trained}
