"""The vocabulary of LLC diagnostic flags ("a;b" strings in llc.parquet), readable without torch.

The estimator (icl_lab.llc) raises the flags; stage finding, plots and studies read them back from tables, so the
rules for which flags count live here, in a numpy/pandas-free module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["PRECISION_FLAGS", "W_STAR_FLAGS", "sampler_ok", "stable_rows"]

W_STAR_FLAGS = frozenset({"not_at_minimum"})  # flags about the checkpoint w*, not the sampler: `pick` ignores them
PRECISION_FLAGS = frozenset({"few_effective_draws"})  # too few draws for the error bar: `pick` ignores it (budget)


def sampler_ok(flags: str | float | None, ignore: frozenset[str] = frozenset()) -> bool:
    """True when a `flags` string ("a;b", as in llc.parquet; NaN or None = no flag) holds no flag but the
    checkpoint's own (W_STAR_FLAGS) and those in `ignore`: the sampler did its job, whatever w* is."""
    names = set(filter(None, flags.split(";"))) if isinstance(flags, str) else set()
    return not names - W_STAR_FLAGS - ignore


def stable_rows(table: pd.DataFrame) -> pd.Series:
    """Rows whose sampler did its job at this ε: no flag but the checkpoint's own and `few_effective_draws` (a matter
    of the budget, not of ε). Read from `flags` when present, else `ok`."""
    if "flags" not in table.columns:
        return table["ok"].astype(bool)
    return table["flags"].map(lambda f: sampler_ok(f, ignore=PRECISION_FLAGS))
