"""Give every stored row that predates `results_store.RunRecord` the provenance git can prove.

Rows measured before rows carried their own provenance say nothing about the commit that made
them. Git still knows when each row's figures were first committed: this script walks every
results file's history (oldest first), fingerprints each stored row by its measured figures, and
records the first commit whose copy of the file held that fingerprint. That commit is an upper
bound on the code that produced the row (the code was committed at or before it), and the tree's
state at measurement time is unknown, so `dirty` is null and `basis` says all of this.

What else is derived, never typed:
- `libraries`: the version pins of `pyproject.toml` at that commit;
- `machine`: what the row itself stored (cores, platform, device), nothing more;
- `contention`: a row that was marked contended at the time (`timing_note`) is `shared: true`;
  the others are `shared: null` (nobody measured it);
- `measured_default`: for StructPrune rows that state no allocation and were first committed
  before the commit that made the relative-energy allocation the default (`DEFAULT_CHANGE`), the
  uniform allocation they ran with, so no table can present them as today's default.

Idempotent: rows that already carry a provenance are left alone.

    .venv/bin/python integration/backfill_provenance.py            # rewrite the results JSON
    .venv/bin/python integration/backfill_provenance.py --dry-run  # print what it would record
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_store import REPO, RESULTS, write_atomic
from results_table import rows_of

#: The commit that made the relative-energy softmax (not uniform ratios) StructPrune's default.
DEFAULT_CHANGE = "f6ce302"
#: Figures a row measured; a row's fingerprint is the tuple of those it has.
MEASURED = (
    "ppl_wiki",
    "ppl_news",
    "ppl",
    "perplexity",
    "prune_seconds",
    "seconds",
    "oneshot_seconds",
    "generate_s",
    "prefill_s",
    "max_rel_logit_diff",
    "forward_seconds",
    "peak_mib",
    "peak_rss_mib",
    "peak_memory_mib",
    "peak_rss_bytes",
    "working_mib",
    "mean_over_median_diag",
)
BASIS = (
    "backfilled from git history: the first commit whose copy of this results file held the row's "
    "figures; the row predates recorded provenance, so the code ran at or before this commit and "
    "the tree's state is unknown"
)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def fingerprint(row: dict[str, Any]) -> str | None:
    figures = {k: row[k] for k in MEASURED if k in row and row[k] is not None}
    if not figures:  # objects such as cuda_check.json nest their figures
        figures = {k: v for k, v in row.items() if isinstance(v, (dict, int, float)) and k != "provenance"}
    return json.dumps(figures, sort_keys=True) if figures else None


def history(path: Path) -> list[tuple[str, str]]:
    """(commit, ISO date) of every commit that touched `path`, oldest first (across renames)."""
    rel = path.relative_to(REPO).as_posix()
    out = git("log", "--follow", "--reverse", "--format=%H %cI", "--", rel)
    return [tuple(line.split(" ", 1)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def first_commits(path: Path) -> dict[str, tuple[str, str]]:
    """fingerprint -> (commit, date) of the first commit holding it."""
    rel = path.relative_to(REPO).as_posix()
    seen: dict[str, tuple[str, str]] = {}
    for commit, date in history(path):
        names = git("show", "--name-only", "--format=", commit).split()
        name = rel if rel in names else next((n for n in names if n.endswith(path.name)), rel)
        try:
            data = json.loads(git("show", f"{commit}:{name}"))
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            continue
        for row in rows_of(data):
            fp = fingerprint(row) if isinstance(row, dict) else None
            if fp is not None and fp not in seen:
                seen[fp] = (commit, date)
    return seen


_PINS: dict[str, dict[str, str]] = {}


def pins_at(commit: str) -> dict[str, str]:
    """The `name==version` pins of pyproject.toml at `commit`."""
    if commit not in _PINS:
        try:
            text = git("show", f"{commit}:pyproject.toml")
        except subprocess.CalledProcessError:
            text = ""
        _PINS[commit] = dict(re.findall(r'"([A-Za-z0-9_.\-]+)==([^"\s;]+)"', text))
    return _PINS[commit]


def is_before(commit: str, later: str) -> bool:
    """Whether `commit` is an ancestor of `later` (and not `later` itself)."""
    if git("rev-parse", commit).strip() == git("rev-parse", later).strip():
        return False
    ok = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, later])
    return ok.returncode == 0


def states_allocation(row: dict[str, Any]) -> bool:
    flags = row.get("flags") or []
    settings = str(row.get("settings") or "")
    return (
        "--allocation" in flags
        or "--temperature" in flags
        or bool(row.get("allocation"))
        or "'allocation'" in settings
        or "equal_widths': True" in settings
    )


def is_structprune(row: dict[str, Any]) -> bool:
    fields = ("method", "importance", "modifier", "name", "model", "case")
    return any(str(row.get(k) or "").lower().startswith("structprune") for k in fields)


#: Results whose every row ran StructPrune with the options its table states (none about the
#: allocation), though the rows name no method: the prune-speed and scale runs, the rounding
#: study's quality runs and width computations, the CUDA check.
ALL_STRUCTPRUNE = ("prune_speed", "scale", "rounding", "cuda_check")


def former_default_label() -> str:
    return f"uniform allocation (temperature inf), the default before {DEFAULT_CHANGE}"


def ran_former_default(stem: str, row: dict[str, Any], commit: str) -> bool:
    structprune = is_structprune(row) or stem in ALL_STRUCTPRUNE
    return structprune and not states_allocation(row) and is_before(commit, DEFAULT_CHANGE)


def backfill_row(
    stem: str, row: dict[str, Any], found: tuple[str, str] | None, latest: tuple[str, str]
) -> dict:
    commit, date = found or latest
    machine = row.get("machine")
    contention: dict[str, Any] = {
        "shared": True if row.get("timing_note") else None,
        "method": "marked contended when measured (timing_note)"
        if row.get("timing_note")
        else "not measured",
    }
    prov: dict[str, Any] = {
        "commit": commit,
        "dirty": None,
        "started": None,
        "committed": date,
        "basis": BASIS
        if found
        else BASIS + " (figures not found verbatim in history: the file's latest commit)",
        "machine": machine if isinstance(machine, dict) else {"label": machine},
        "libraries": pins_at(commit),
        "contention": contention,
    }
    if ran_former_default(stem, row, commit):
        prov["measured_default"] = (
            f"uniform allocation (temperature inf), the default before {DEFAULT_CHANGE}"
        )
    return prov


def backfill(path: Path, dry_run: bool) -> int:
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = rows_of(data)
    todo = [r for r in rows if isinstance(r, dict) and "provenance" not in r]
    relabel = [
        r
        for r in rows
        if isinstance(r, dict)
        and str((r.get("provenance") or {}).get("basis", "")).startswith("backfilled")
        and "measured_default" not in r["provenance"]
        and ran_former_default(path.stem, r, r["provenance"]["commit"])
    ]
    for row in relabel:  # rows backfilled before ALL_STRUCTPRUNE named their file
        row["provenance"]["measured_default"] = former_default_label()
    if not todo:
        if relabel and not dry_run:
            write_atomic(path, json.dumps(data, indent=1) + "\n")
        return len(relabel)
    seen = first_commits(path)
    hist = history(path)
    if not hist:
        return 0
    for row in todo:
        fp = fingerprint(row)
        prov = backfill_row(path.stem, row, seen.get(fp) if fp else None, hist[-1])
        if dry_run:
            label = row.get("name") or row.get("model") or "?"
            print(f"{path.name}: {label} -> {prov['commit'][:7]} {prov.get('measured_default', '')}")
        row["provenance"] = prov
    if not dry_run:
        write_atomic(path, json.dumps(data, indent=1) + "\n")
    return len(todo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("files", nargs="*", type=Path, help="results JSON files (default: all)")
    args = parser.parse_args()
    files = [p.resolve() for p in args.files] or sorted(RESULTS.glob("*.json"))
    for path in files:
        n = backfill(path, args.dry_run)
        print(f"{path.relative_to(REPO)}: {n} rows backfilled")


if __name__ == "__main__":
    main()
