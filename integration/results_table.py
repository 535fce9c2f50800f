"""How results tables show a row's provenance: the one set of helpers every benchmark renders with.

Every `.md` in `integration/results/` is rendered from its JSON by its script's `render_markdown`,
and every row carries a provenance (a `results_store.RunRecord`'s, or one backfilled from git
history). Readers compare tables across files, so every table must say the same thing the same
way: the rows of a results file, the dagger on a figure measured while other jobs shared the
machine and the note or legend that explains it, which rows predate recorded provenance, the
machine and library versions a row ran with, its allocation and the label of rows measured under
the former (uniform) default, and its calibration. Those helpers live here once, instead of in
whichever benchmark happened to need them first.

`results_store` stays the writer (rows, provenance, files); this module only reads parsed rows.
Every function is a pure function of them: rendering a table needs neither torch nor the package.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import results_store

#: The mark on a figure measured while other jobs shared the machine.
DAGGER = "†"
#: What a table says of a row measured under StructPrune's former default allocation.
FORMER_DEFAULT = "uniform allocation, the former default"
#: The footnote under a table of times (`shared_note`'s default).
SHARED_TIMES = (
    "other jobs shared the machine while the row ran (its provenance's contention record: measured "
    "by its RunRecord, or marked when it was measured): its times are upper bounds."
)


# --- rows and what their provenance says -----------------------------------------------------------


def rows_of(data: Any) -> list[dict[str, Any]]:
    """The rows of a parsed results file: a list, the `rows` of a `{"rows": [...], ...}` object,
    or one object (one row); anything else holds none."""
    if isinstance(data, dict):
        return data["rows"] if isinstance(data.get("rows"), list) else [data]
    return list(data) if isinstance(data, list) else []


def provenance_of(row: dict[str, Any]) -> dict[str, Any]:
    """The row's provenance ({} when it records none)."""
    return row.get("provenance") or {}


def former_default(row: dict[str, Any]) -> bool:
    """Whether the row ran under StructPrune's former (uniform) default, as its provenance says."""
    return bool(provenance_of(row).get("measured_default"))


def backfilled(row: dict[str, Any]) -> bool:
    """Whether the row's provenance was backfilled from git history (it predates recorded provenance)."""
    return "basis" in provenance_of(row)


def rows_text(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def predates_note(rows: list[dict[str, Any]]) -> str:
    """What follows a commit named in prose when rows were backfilled: the commit is the first whose
    results held their figures, not the code that ran ('' when no row was backfilled)."""
    if not any(backfilled(r) for r in rows):
        return ""
    the, predate, their = (
        ("the row", "predates", "its") if len(rows) == 1 else ("the rows", "predate", "their")
    )
    return (
        f" ({the} {predate} recorded provenance: the first commit whose copy of the results held"
        f" {their} figures, so {their} code ran at or before it)"
    )


# --- the dagger: figures measured while other jobs shared the machine -------------------------------


def mark(*rows: dict[str, Any]) -> str:
    """The dagger a measured figure carries when other jobs shared the machine during its row (or,
    for a figure drawn from several rows, during any of them)."""
    return f" {DAGGER}" if any(results_store.was_shared(r) for r in rows) else ""


def shared_note(rows: Iterable[dict[str, Any]], explanation: str = SHARED_TIMES) -> list[str]:
    """The footnote that explains the dagger, when some row carries it."""
    if not any(results_store.was_shared(r) for r in rows):
        return []
    return ["", f"{DAGGER} {explanation}"]


def provenance_legend(
    rows: list[dict[str, Any]],
    timed: bool = True,
    figure: str = "a time",
    bound: str = "an upper bound; perplexities are unaffected",
) -> str:
    """What the `commit` column and the dagger mean, with the counts these rows give. `figure` is
    what the dagger marks and `bound` what sharing the machine makes of it; `timed=False` leaves
    the dagger out (tables of quality figures only)."""
    count = sum(backfilled(r) for r in rows)
    text = "`commit`: the code that produced the row (`+`: with uncommitted changes, `?`: not recorded)."
    if count:
        text += (
            f" {count} of {rows_text(len(rows))} predate recorded provenance: they name the first"
            " commit whose copy of the results held their figures, so their code ran at or before it."
        )
    if not timed:
        return text
    shared = sum(results_store.was_shared(r) for r in rows)
    unknown = sum((provenance_of(r).get("contention") or {}).get("shared") is None for r in rows)
    text += (
        f" {DAGGER} marks {figure} measured while other jobs shared the machine ({shared} of"
        f" {rows_text(len(rows))}): {bound}."
    )
    if unknown:
        text += f" Whether the machine was shared was not recorded for {rows_text(unknown)} (no mark)."
    return text


# --- where and with what a row ran ------------------------------------------------------------------


def machine_of(row: dict[str, Any]) -> str:
    """Where a row ran, for a table's column (and row keys): the label or fields a row measured
    before provenance stored, else the machine its RunRecord recorded (CPU model, cores, GPU if any)."""
    old = row.get("machine")
    if isinstance(old, str):
        return old
    if isinstance(old, dict):  # rows that stored {"cpus": ..., "platform": ...}
        return f"{old.get('cpus')} cores, {old.get('platform')}"
    recorded = provenance_of(row).get("machine") or {}
    if recorded.get("cpu"):
        text = f"{recorded['cpu']}, {recorded.get('cores')} cores"
        return f"{text}, {recorded['gpu']}" if recorded.get("gpu") else text
    return recorded.get("label") or "not recorded"


def _cores_label(row: dict[str, Any]) -> str:
    """The machine a row ran on, from its provenance alone, as `machine_summary` counts it (new rows:
    cores and CPU model, GPU; rows backfilled from git history: the cores they stored)."""
    machine = provenance_of(row).get("machine") or {}
    cores = machine.get("cores") or machine.get("cpus")
    label = f"{cores}-core {machine.get('cpu') or 'CPU'}" if cores else "machine not recorded"
    return label + (f", {machine['gpu']}" if machine.get("gpu") else "")


def machine_summary(rows: list[dict[str, Any]]) -> str:
    """Each machine the rows ran on, with how many rows ran there (for a table's header)."""
    counts = Counter(_cores_label(r) for r in rows)
    return "; ".join(f"{label} ({rows_text(n)})" for label, n in sorted(counts.items()))


def libraries_of(row: dict[str, Any], names: Iterable[str]) -> str:
    """The versions of `names` a row ran with: installed ones from its RunRecord, or for a row
    measured before that the pins pyproject.toml held at its commit (said so: what was installed
    on that machine is not known)."""
    provenance = provenance_of(row)
    libraries = provenance.get("libraries") or {}
    found = ", ".join(f"{name} {libraries[name]}" for name in names if name in libraries)
    if not found:
        return "not recorded"
    return f"{found} (pinned at the commit)" if provenance.get("basis") else found


# --- how a row pruned -------------------------------------------------------------------------------


def allocation_of(row: dict[str, Any]) -> str:
    """The layer allocation a pruning row ran with: for rows that predate today's default and ran
    under the former one, that; else the resolved rule the row recorded (with its temperature where
    one applies); else "not recorded"."""
    if former_default(row):
        return FORMER_DEFAULT
    rule = row.get("allocation")
    if not isinstance(rule, str):
        return "not recorded"
    temperature = ((row.get("run") or {}).get("settings") or {}).get("temperature")
    if (
        rule.startswith(("energy", "kl"))
        and isinstance(temperature, (int, float))
        and math.isfinite(temperature)
    ):
        return f"{rule} (T = {temperature:g})"
    return rule


def calibration_text(calibration: dict[str, Any]) -> str:
    """A recorded calibration of text windows: `N x L tokens of `split` (seed S)`."""
    c = calibration
    return (
        f"{c['samples']} x {c['seq_len']} tokens of `{c.get('split') or c.get('source')}` (seed {c['seed']})"
    )
