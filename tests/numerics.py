"""What makes a numeric comparison hold on every CPU (see docs/development.md).

Two computations of the same image (batched and alone, sharded and not, on another vector unit) agree to float32
rounding, about 1e-6 of ``d_t``. A DTP decision compares neighbouring ``d_t`` values; where two of them are closer
than that noise, the switch step, and with it the whole image, can differ between the two computations. Tests
that compare DTP images across computations check first that their inputs are away from such a tie, so a fixture
that lands on one fails with this reason instead of on some CPUs only.
"""

from __future__ import annotations

from collections.abc import Sequence

TIE = 1e-4  # relative gap below which a DTP comparison is called a tie: 100x float32's batch-to-batch noise


def dtp_margin(d: Sequence[float]) -> float:
    """The smallest relative gap ``|a - b| / max(|a|, |b|)`` among the comparisons Algorithm 1 makes on ``d`` up to
    and including its switch (``d[k-2] > d[k-1]`` and ``d[k-1] < d[k]`` for ``k = 2, 3, ...``)."""
    gaps = []
    for k in range(2, len(d)):
        for a, b in ((d[k - 2], d[k - 1]), (d[k - 1], d[k])):
            gaps.append(abs(a - b) / max(abs(a), abs(b), 1e-30))
        if d[k - 2] > d[k - 1] < d[k]:
            break
    return min(gaps, default=float("inf"))


def assert_away_from_dtp_ties(rows: Sequence[Sequence[float]]) -> None:
    """Every trajectory's DTP comparisons are farther apart than :data:`TIE`."""
    margins = [dtp_margin([float(v) for v in row]) for row in rows]
    assert min(margins) > TIE, (f"a DTP decision of this fixture is a near-tie (relative gap {min(margins):.2e} <= "
                                f"{TIE}): its switch could differ between CPUs; choose other seeds or prompts")
