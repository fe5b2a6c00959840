"""Which prompt tokens run in a step: first come, first served, under a token budget.

Each step runs every decode row plus at most `budget` prompt tokens, so a long prompt never
stalls the streams already running (it is prefilled over several steps). The prompt chunks
of a step run as one right-padded batch (rows x width); the width is chosen to run the most
prompt tokens within the budget, and the oldest waiting prompt is always in it.
"""

from __future__ import annotations


def plan_prefill(remaining: list[int], budget: int) -> list[int]:
    """Tokens to run for each prompt (in admission order) given the tokens each has left:
    rows x width <= budget, the first prompt always included."""
    if not remaining:
        return []
    best = (0, 1, 1)  # useful tokens, width, rows
    for width in sorted({min(left, budget) for left in remaining}):
        rows = min(len(remaining), max(1, budget // width))
        useful = sum(min(left, width) for left in remaining[:rows])
        if useful > best[0]:
            best = (useful, width, rows)
    _, width, rows = best
    return [min(left, width) for left in remaining[:rows]] + [0] * (len(remaining) - rows)
