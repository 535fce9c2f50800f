"""The one writer of benchmark results: every stored row says where it came from.

A figure is only worth quoting if a reader can tell which code produced it, with which settings,
on which machine, and whether something else was eating the cores at the time. Every benchmark
script therefore measures its rows inside a `RunRecord` and stores them with `store_rows`; both
live here so that no script writes that information its own way (or forgets it).

`RunRecord` captures, when a row starts:
- the commit and whether the tracked tree differed from it (edits to `integration/results/`,
  which the benchmarks themselves write between rows, do not count as dirty);
- the machine: CPU model, cores, memory, GPU (if torch sees one), platform;
- the versions of the libraries that make the figures (torch, the hosts, the runtimes);
and, when it ends, whether other jobs shared the machine: the CPU time the whole machine spent
busy (`/proc/stat`) minus what this process and its waited-for children spent (`getrusage`),
divided by the wall time, in cores. More than `SHARED_CORES` of other work marks the row's times
as upper bounds (`contention.shared`); quality figures (perplexities) are unaffected by it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from struprune_plugin.outputs import write_text_atomic  # noqa: E402

RESULTS = REPO / "integration" / "results"
#: Other jobs' CPU use, in cores averaged over the run, above which a row's times are marked shared.
SHARED_CORES = 0.25
#: The distributions whose versions change the figures.
LIBRARIES = (
    "torch",
    "transformers",
    "torch-pruning",
    "llmcompressor",
    "compressed-tensors",
    "optimum",
    "optimum-onnx",
    "onnxruntime",
    "datasets",
    "safetensors",
    "gguf",
    "llama-cpp-python",
    "vllm",
    "peft",
    "trl",
)
#: Row keys every provenance carries (the schema `check_provenance` enforces).
PROVENANCE_KEYS = ("commit", "dirty", "started", "machine", "libraries", "contention")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def code_state() -> dict[str, Any]:
    """The commit checked out and the tracked files that differ from it (results files aside)."""
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = [
        line[3:]
        for line in (status or "").splitlines()
        if line[3:] and not line[3:].startswith("integration/results/")
    ]
    return {
        "commit": commit,
        "dirty": None if status is None else bool(changed),
        "dirty_files": changed[:20],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": _gpu(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def libraries() -> dict[str, str]:
    """Installed versions of `LIBRARIES` (absent ones are left out)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _busy_jiffies() -> int | None:
    """CPU time the whole machine spent busy since boot, in clock ticks (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle  # guest time is already inside user time


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class RunRecord:
    """Provenance of one measured row: enter before the work, read `.provenance` after it.

    `with RunRecord() as record: ...; row["provenance"] = record.provenance`. Child processes
    count as this run's own work once they have been waited for (subprocess.run does)."""

    def __init__(self) -> None:
        self._start: tuple[float, int | None, float] | None = None
        self._end: tuple[float, int | None, float] | None = None
        self._static: dict[str, Any] = {}
        self._load_end: list[float] | None = None

    def __enter__(self) -> RunRecord:
        self._static = {
            **code_state(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "libraries": libraries(),
            "load_average_start": _load_average(),
        }
        self._start = (time.monotonic(), _busy_jiffies(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = (time.monotonic(), _busy_jiffies(), _own_cpu_seconds())
        self._load_end = _load_average()

    @property
    def contention(self) -> dict[str, Any]:
        if self._start is None or self._end is None:
            raise RuntimeError("RunRecord.contention is known only after the `with` block ends")
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._end
        wall = max(t1 - t0, 1e-9)
        if busy0 is None or busy1 is None:
            return {"wall_seconds": wall, "other_cores": None, "shared": None, "method": "unavailable"}
        tick = os.sysconf("SC_CLK_TCK")
        other = max((busy1 - busy0) / tick - (own1 - own0), 0.0) / wall
        return {
            "wall_seconds": round(wall, 3),
            "other_cores": round(other, 3),
            "own_cpu_seconds": round(own1 - own0, 3),
            "shared": other > SHARED_CORES,
            "method": f"/proc/stat busy time minus own getrusage time; shared above {SHARED_CORES} cores",
            "load_average_start": self._static.get("load_average_start"),
            "load_average_end": self._load_end,
        }

    @property
    def provenance(self) -> dict[str, Any]:
        static = {k: v for k, v in self._static.items() if k != "load_average_start"}
        return {**static, "contention": self.contention}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def check_provenance(row: dict[str, Any]) -> list[str]:
    """What a stored row lacks (an empty list when it says where it came from)."""
    prov = row.get("provenance")
    if not isinstance(prov, dict):
        return ["provenance"]
    return [key for key in PROVENANCE_KEYS if key not in prov]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a sibling temporary file (the package's own atomic write),
    so a reader never sees half a results file."""
    write_text_atomic(path, text)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The stored rows: a JSON list, or the `rows` of a JSON object with other keys beside it."""
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["rows"] if isinstance(data, dict) else data


def store_rows(
    path: Path,
    new_rows: Iterable[dict[str, Any]],
    key: Callable[[dict[str, Any]], Any],
    render: Callable[[list[dict[str, Any]]], str] | None = None,
    meta: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Merge `new_rows` into the stored rows at `path` (a stored row with the same key is replaced,
    order kept), write the JSON atomically, and write `render(rows)` beside it as `.md`.

    A file stored as `{"rows": [...], ...}` keeps that shape (`meta` updates its other keys).
    Every new row must carry a provenance (a `RunRecord`'s); rows already stored are kept as
    they are. Re-reads the file first, so several processes may fill one file a row at a time."""
    new_rows = list(new_rows)
    for row in new_rows:
        missing = check_provenance(row)
        if missing:
            raise ValueError(f"row {key(row)!r} lacks {missing}: measure it inside a RunRecord")
    json_path = path.with_suffix(".json")
    container = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else None
    rows = load_rows(json_path)
    index = {key(r): i for i, r in enumerate(rows)}
    for row in new_rows:
        if key(row) in index:
            rows[index[key(row)]] = row
        else:
            index[key(row)] = len(rows)
            rows.append(row)
    if isinstance(container, dict) or meta is not None:
        data: Any = {**(container if isinstance(container, dict) else {}), **(meta or {}), "rows": rows}
    else:
        data = rows
    write_atomic(json_path, json.dumps(data, indent=1) + "\n")
    if render is not None:
        write_atomic(path.with_suffix(".md"), render(rows))
    return rows


def from_prune_report(report: dict[str, Any]) -> dict[str, Any]:
    """What a row must say about a `struprune prune` run, read from its `struprune_report.json`:
    the fully resolved settings (method, allocation and options, rounding, damping, ridge, solver
    tokens...), calibration, dtype, device, requested and achieved sparsity, and the widths each
    layer kept ([before, after] heads, KV heads and MLP channels)."""
    pruning = report["pruning"]
    return {
        "method": pruning.get("method"),
        "settings": pruning.get("settings"),
        "calibration": report.get("calibration"),
        "dtype": pruning.get("dtype"),
        "device": pruning.get("device"),
        "requested_sparsity": pruning.get("requested_sparsity"),
        "achieved_sparsity": pruning.get("achieved_sparsity"),
        "widths": [
            {k: layer.get(k) for k in ("index", "heads", "kv_heads", "mlp")}
            for layer in report.get("layers", [])
        ],
    }


def short(provenance: dict[str, Any] | None) -> str:
    """`abc1234` (or `abc1234+` when the tree was dirty), for tables."""
    if not provenance or not provenance.get("commit"):
        return "?"
    return provenance["commit"][:7] + ("+" if provenance.get("dirty") else "")


def was_shared(row: dict[str, Any]) -> bool:
    """Whether other jobs shared the machine while the row ran (times are then upper bounds)."""
    contention = (row.get("provenance") or {}).get("contention") or {}
    return bool(contention.get("shared"))


#: Results stem -> the script (under integration/) that writes it. Every file in
#: `integration/results/` belongs to one of these stems (a plot's name starts with its stem), and
#: every script exposes `render_markdown(stem, data) -> str`, the `.md` it writes from the JSON.
GENERATORS: dict[str, str] = {
    "quality": "benchmark_quality.py",
    "quality_gemma3": "benchmark_quality.py",
    "allocation": "benchmark_allocation.py",
    "generalisation": "benchmark_generalisation.py",
    "rounding": "benchmark_rounding.py",
    "rounding_llamacpp": "benchmark_speed.py",
    "speed": "benchmark_speed.py",
    "prune_speed": "benchmark_prune_speed.py",
    "memory_scaling": "benchmark_memory.py",
    "global_memory": "benchmark_global_memory.py",
    "scale": "benchmark_scale.py",
    "gguf": "gguf_check.py",
    "cuda_check": "cuda_check.py",
    "gram_spread_smollm2": "gram_spread.py",
    "llmcompressor": "llmcompressor/oneshot_smollm2.py",
    "heal": "benchmark_heal.py",
    "torch_pruning": "torch_pruning/prune_llm.py",
}


def stem_of(path: Path) -> str | None:
    """The results stem a file in `integration/results/` belongs to (the longest matching one)."""
    matches = [s for s in GENERATORS if path.name.split(".")[0] == s or path.name.startswith(s + "_")]
    return max(matches, key=len) if matches else None
