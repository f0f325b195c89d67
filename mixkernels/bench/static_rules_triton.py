"""Loop trip counts of the Triton kernels (see :mod:`static_rules`): :data:`TRITON_RULES`, and
:func:`triton_range`, which evaluates ``for x in range(...)`` loops whose bounds are kernel arguments."""
from __future__ import annotations

import ast
import re
from typing import Any, Dict, List, Optional, Tuple

from .static_rules import TOP, Ctx, Rule

__all__ = ["TRITON_RULES", "triton_range"]


def _rng(*a):
    return range(*[int(x) for x in a])


def _seg_tiles(where: str, key: str, why: str) -> List[Rule]:
    """A key loop of ``_seg_tile`` at its two call sites: half tiles (``seg_walk``'s ``key``_small), full
    tiles (``key``_big); ``why`` names the tile kind at ``{}``."""
    return [Rule(where, lambda c: _seg(c)[key + "_small"], why.format("half"), via=r"_seg_tile\(BLOCK_M // 2",
                 inside=r"while t < nbig \+ nsmall"),
            Rule(where, lambda c: _seg(c)[key + "_big"], why.format("full"), via=r"_seg_tile\(BLOCK_M,",
                 inside=r"while t < nbig:")]


def triton_range(site_text: str, args: Dict[str, Any]) -> Optional[Tuple[float, str]]:
    """Trip count of ``for x in range(...)`` when its bounds are kernel arguments/constants only."""
    m = re.search(r"\bin\s+(?:tl\.)?range\((.*)\)\s*:", site_text)
    if not m:
        return None
    expr = "range(" + m.group(1) + ")"
    env = {k: v for k, v in args.items() if isinstance(v, (int, bool))}
    try:
        tree = ast.parse(expr, mode="eval")
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - {"range", "tl"}
        if not names <= set(env):
            return None
        code = compile(expr.replace("tl.range(", "range("), "<loop>", "eval")
        r = eval(code, {"__builtins__": {}, "range": _rng, "tl": _TL}, env)  # noqa: S307 - names checked above
        return float(len(r)), f"range evaluated from the launch arguments: len({expr}) = {len(r)}"
    except Exception:  # noqa: BLE001 - not evaluable: left to the rules
        return None


class _TL:
    minimum = staticmethod(min)
    maximum = staticmethod(max)
    cdiv = staticmethod(lambda a, b: -(-a // b))


TRITON_RULES: List[Rule] = [
    # window_attention.py / window_attention_bwd.py: full blocks of a window (the tails are separate
    # calls, not loops); N_FULL = (N // BLOCK) * BLOCK are constexpr locals, so range() cannot be
    # evaluated from the arguments alone
    Rule(r"for n0 in range\(0, N_FULL, BLOCK_N\)", lambda c: c.a("N") // c.a("BLOCK_N"),
         "full key blocks: N // BLOCK_N"),
    Rule(r"for m0 in range\(0, M_FULL, BLOCK_M\)", lambda c: c.a("N") // c.a("BLOCK_M"),
         "full query tiles: N // BLOCK_M"),
    Rule(r"for n0 in range\(0, NB_FULL, BLOCK_NB\)", lambda c: c.a("N") // c.a("BLOCK_NB"),
         "full key blocks of phase B: N // BLOCK_NB"),
    # Triton backward single pass (_wattn_bwd_sp.py): query blocks of BLOCK_Q = the launch's BLOCK_N
    Rule(r"for m0 in range\(0, Q_FULL, BLOCK_Q\)", lambda c: c.a("N") // c.a("BLOCK_N"),
         "full query blocks of the single pass: N // BLOCK_N"),
    # ``for i in range(0, WPP)`` whose back edge carries the line of the _next_window call ending its body
    Rule(r"b = tl\.where\(wrap, b \+ 1, b\)|return w \+ 1, b, wy, wx", lambda c: c.a("WPP"),
         "windows per program: WPP (the loop's back edge carries _next_window's line)", via=r"_next_window\(",
         inside=TOP),
    # Triton by-segment forward (_wattn_seg.py): data-dependent walks, from the segment model on the
    # case's masks (wattn_workload.seg_walk); the all-keys masked walk runs only for a head whose V holds
    # NaN/Inf. The key loops of _seg_tile are told apart by its call site (full or half tiles).
    Rule(r"while t < nbig:", lambda c: _seg(c)["big"], "full (BLOCK_M-row) query tiles per window "
         "(segment model, wattn_workload.seg_walk)"),
    Rule(r"while t < nbig \+ nsmall", lambda c: _seg(c)["small"],
         "half (BLOCK_M/2-row) tiles per window: a segment's last rows when they fit one (segment model)"),
    Rule(r"while go:", lambda c: 1.0, "the by-segment tile's walk: once (a second walk only when the probe's "
         "reference fails a row: overflow, NaN/Inf, all-masked rows; never at the model's inputs)"),
    Rule(r"while n1 < c1:", lambda c: 0.0, "the by-segment tile's max pass: only before a second walk (never at "
         "the model's inputs)"),
    *_seg_tiles(r"while n0 \+ 2 \* BLOCK_N <= a1", "wide",
                "unmasked double key blocks per {} tile (WIDE): floor(s/(2*BLOCK_N)) (segment model)"),
    *_seg_tiles(r"while n0 < a1", "full", "unmasked key blocks per {} tile: floor(s/BLOCK_N) of its segment "
                "(WIDE: the odd one; segment model)"),
    *_seg_tiles(r"while n0 < c2", "masked", "masked key block per {} tile: 1 when BLOCK_N does not divide s "
                "(TAIL: when more than BLOCK_N/2 keys are left; segment model; all the window's blocks only for "
                "a head whose V holds NaN/Inf: never here)"),
    *_seg_tiles(r"while n0 < c3", "tail", "masked half key block per {} tile (TAIL): 1 when 0 < s % BLOCK_N <= "
                "BLOCK_N/2 (QUARTER: BLOCK_N/4 < s % BLOCK_N <= BLOCK_N/2; segment model)"),
    *_seg_tiles(r"while n0 < c1:", "quarter", "masked quarter key block per {} tile (QUARTER): 1 when "
                "0 < s % BLOCK_N <= BLOCK_N/4 (segment model)"),
    # deterministic coords path: the box of table rows / cols a tile touches (upper bound)
    Rule(r"while y <= y_end", lambda c: 2 * c.a("WH") - 1, "table rows: <= 2*WH-1"),
    Rule(r"while x <= x_end", lambda c: 2 * c.a("WW") - 1, "table cols: <= 2*WW-1"),
]


def _seg(c: Ctx) -> Dict[str, float]:
    from . import wattn_workload as ww

    p = c.p
    return ww.seg_walk(p["H"], p["W"], p["window"], p["shift"], bool(p["group"]), c.a("BLOCK_M"), c.a("BLOCK_N"),
                       tail=bool(c.a("TAIL")), wide=bool(c.a("WIDE")), quarter=bool(c.args.get("QUARTER", False)))
