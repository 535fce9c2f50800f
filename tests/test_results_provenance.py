"""Every stored result says where it came from, and every results file is generated, not typed.

The checks read `integration/results/` as committed: each row carries a provenance, each file
belongs to a generating script, and each `.md` is exactly what its script renders from the JSON.
The writer itself (`integration/results_store.py`) is checked against independent facts: a git
repository made here, and a CPU-burning process that is not the run's own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
INTEGRATION = REPO / "integration"
RESULTS = INTEGRATION / "results"
sys.path.insert(0, str(INTEGRATION))
import results_store  # noqa: E402

RESULT_FILES = sorted(p for p in RESULTS.iterdir() if not p.name.startswith("."))
JSON_FILES = [p for p in RESULT_FILES if p.suffix == ".json"]


def _rows(data: object) -> list[dict]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        return data["rows"]
    return [data]  # a single-object result (one row)


def _known_commits(commits: set[str]) -> set[str]:
    """Those of `commits` this repository holds as commits (one `git cat-file` for all)."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "--batch-check"],
        input="".join(f"{c}\n" for c in sorted(commits)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["commit"]}


def _shallow() -> bool:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"], capture_output=True, text=True
    )
    return out.stdout.strip() == "true"


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.name)
def test_every_stored_row_says_where_it_came_from(path: Path) -> None:
    rows = _rows(json.loads(path.read_text()))
    assert rows, f"{path.name} holds no rows"
    for row in rows:
        missing = results_store.check_provenance(row)
        assert not missing, f"{path.name}: row {row.get('name', '?')} lacks {missing}"
    if _shallow():  # a shallow clone lacks the older commits; a full clone checks them
        return
    # every commit is real: git knows it (an independent check of what was recorded)
    commits = {row["provenance"]["commit"] for row in rows}
    unknown = commits - _known_commits(commits)
    assert not unknown, f"{path.name}: {sorted(unknown)} are not commits of this repository"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_every_results_file_has_a_generating_script(path: Path) -> None:
    stem = results_store.stem_of(path)
    assert stem is not None, f"{path.name} belongs to no generating script (results_store.GENERATORS)"
    script = INTEGRATION / results_store.GENERATORS[stem]
    assert script.is_file(), f"{script} is missing"
    assert path.name.split(".")[0] == stem or path.suffix == ".png", (
        f"{path.name}: only plots may add to a stem"
    )


def _script(name: str) -> ModuleType:
    path = INTEGRATION / name
    spec = importlib.util.spec_from_file_location(f"_generator_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


MARKDOWN = [p for p in RESULT_FILES if p.suffix == ".md"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_every_markdown_is_what_its_script_renders_from_the_json(path: Path) -> None:
    stem = results_store.stem_of(path)
    module = _script(results_store.GENERATORS[stem])
    data = json.loads(path.with_suffix(".json").read_text())
    assert module.render_markdown(stem, data) == path.read_text(), (
        f"{path.name} differs from what {results_store.GENERATORS[stem]} renders from {stem}.json: "
        "edit the script, not the .md, and re-render"
    )


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def scratch_repo(tmp_path, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    (repo / "integration" / "results").mkdir(parents=True)
    _git(tmp_path, "init", "-q", str(repo))
    (repo / "code.py").write_text("x = 1\n")
    (repo / "integration" / "results" / "r.json").write_text("[]\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "one")
    monkeypatch.setattr(results_store, "REPO", repo)
    return repo


def test_code_state_names_the_commit_and_ignores_results_edits(scratch_repo: Path) -> None:
    head = _git(scratch_repo, "rev-parse", "HEAD").strip()
    assert results_store.code_state() == {"commit": head, "dirty": False, "dirty_files": []}
    (scratch_repo / "integration" / "results" / "r.json").write_text("[1]\n")  # a benchmark's own write
    assert results_store.code_state()["dirty"] is False
    (scratch_repo / "code.py").write_text("x = 2\n")
    state = results_store.code_state()
    assert state["dirty"] is True and state["dirty_files"] == ["code.py"]


def test_a_record_carries_every_key_and_the_installed_versions(scratch_repo: Path) -> None:
    import torch

    with results_store.RunRecord() as record:
        pass
    prov = record.provenance
    assert not results_store.check_provenance({"provenance": prov})
    assert prov["libraries"]["torch"] == torch.__version__
    assert prov["machine"]["cores"] >= 1 and prov["commit"] == _git(scratch_repo, "rev-parse", "HEAD").strip()


_BURN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


def test_other_jobs_on_the_machine_mark_the_run_shared() -> None:
    """A process that is not the run's own burns a core during the run: the record sees it."""
    other = subprocess.Popen([sys.executable, "-c", _BURN.format(s=3.0)])
    try:
        time.sleep(0.5)  # the other job is running before the run starts
        with results_store.RunRecord() as record:
            time.sleep(1.5)
        contention = record.contention
    finally:
        other.wait()  # waited for only after the record closed: not the run's own work
    assert contention["other_cores"] >= 0.5, contention
    assert contention["shared"] is True


_BURN_CPU = "import time\nwhile time.process_time() < {s}: pass\n"


def test_a_runs_own_children_are_not_other_jobs() -> None:
    """CPU the run spends itself, in a child it waits for, is its own work, not contention: the
    child burns a fixed CPU time (not wall time), so the count holds however busy the machine is."""
    with results_store.RunRecord() as record:
        subprocess.run([sys.executable, "-c", _BURN_CPU.format(s=1.0)], check=True)
    contention = record.contention
    assert contention["own_cpu_seconds"] >= 1.0, contention
    # what the child burned is not counted again as other jobs' work
    busy_cores = contention["other_cores"] + contention["own_cpu_seconds"] / contention["wall_seconds"]
    assert busy_cores <= (os.cpu_count() or 1) + 0.1, contention


def test_store_rows_refuses_rows_without_provenance_and_keeps_the_files_shape(tmp_path) -> None:
    with pytest.raises(ValueError, match="RunRecord"):
        results_store.store_rows(tmp_path / "x.json", [{"name": "a"}], key=lambda r: r["name"])
    with results_store.RunRecord() as record:
        pass
    prov = record.provenance
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"meta": {"m": 1}, "rows": [{"name": "a", "v": 1}]}))
    rows = results_store.store_rows(
        path,
        [{"name": "a", "v": 2, "provenance": prov}, {"name": "b", "v": 3, "provenance": prov}],
        key=lambda r: r["name"],
        render=lambda rs: "|".join(str(r["v"]) for r in rs),
    )
    stored = json.loads(path.read_text())
    assert stored["meta"] == {"m": 1} and [r["v"] for r in stored["rows"]] == [2, 3] == [r["v"] for r in rows]
    assert path.with_suffix(".md").read_text() == "2|3"
