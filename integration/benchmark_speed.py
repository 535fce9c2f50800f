"""Speed benchmark: dense vs pruned SmolLM2, prefill and decode tokens/s, PyTorch and ONNX Runtime.

For every model (the dense SmolLM2 and the pruned folders the quality benchmark wrote,
runs/quality/structprune-{20,30,50}): parameters, checkpoint size, and

* prefill (batch 1): one forward over a 512-token prompt that yields the next token's logits, as
  generation's first step does (PyTorch: `logits_to_keep=1`; Optimum's ONNX graph always
  computes the logits of every position, a cost pruning cannot shrink);
* decode, at every `--batch` size, two ways over the same greedy tokens (64 new tokens after a
  64-token prompt, KV cache, end-of-sequence disabled so every run makes all of them):
  - `generate()`: the host's generation loop, what a transformers / Optimum user calls;
    tokens/s = batch x 63 decode steps / (generate time - the prompt's prefill time);
  - `model loop`: a plain greedy loop that owns the KV cache and calls the model directly
    (PyTorch: the module's forward; ONNX Runtime: `InferenceSession.run` on the exported graph),
    as a serving engine does. Its tokens are checked against `generate()`'s.
  ONNX Runtime's `generate()` session runs without intra-op spinning and the loop's with it,
  each the faster setting for its workload (`struprune_plugin.onnx_export.cpu_session_options`).

The gap between the two is per-token Python work in the host's loop (logits processors, stopping
criteria, input conversion) that is the same for dense and pruned models. A least-squares fit of
time per decode step against parameter count splits every configuration's step into a fixed
part and a part proportional to the weights; it is printed under the table.

`--backend torch` runs in the main environment; `--backend ort` exports each folder with
Optimum (struprune_plugin.onnx_export) and runs `ORTModelForCausalLM`, so it needs the export
environment (`bash scripts/install_export_env.sh`). Rows of both backends accumulate in
integration/results/speed.{json,md,png}. Target: speed-up >= 0.9 x (dense / pruned parameters).

    .venv/bin/python integration/benchmark_speed.py --backend torch
    .venv-export/bin/python integration/benchmark_speed.py --backend ort
    .venv/bin/python integration/benchmark_speed.py --backend llamacpp-f16 --batch 1

`--backend llamacpp-f16` / `llamacpp-q8_0` export each folder with `struprune export gguf` and run
it in llama.cpp (llama-cpp-python built from source, `bash scripts/install_llama_cpp.sh`), batch 1:
prefill is one `eval` of the 512-token prompt (llama.cpp computes the last position's logits),
`generate()` the bindings' greedy sampling iterator, the model loop `eval` + argmax per token.

Each batch size's rounds run inside a `results_store.RunRecord`: every row records the commit, the
machine, the library versions and whether other jobs shared the machine while it was timed, and
the command line that made it (`command`), which the .md lists. `--out` writes another stem (e.g.
integration/results/rounding_llamacpp); `--report-only` rewrites a stem's .md from its JSON:

    .venv/bin/python integration/benchmark_speed.py --report-only
    .venv/bin/python integration/benchmark_speed.py --report-only --out integration/results/rounding_llamacpp
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
import results_store  # noqa: E402
from results_table import FORMER_DEFAULT, former_default, libraries_of, machine_of, mark, rows_of, shared_note  # noqa: E402

RESULTS = ROOT / "integration" / "results" / "speed"
#: The libraries whose versions make each backend's figures.
BACKEND_LIBRARIES = {
    "torch": ("torch", "transformers"),
    "ort": ("onnxruntime", "optimum", "optimum-onnx", "transformers", "torch"),
    "llamacpp-f16": ("llama-cpp-python", "gguf"),
    "llamacpp-q8_0": ("llama-cpp-python", "gguf"),
}
DEFAULT_PRUNED = [ROOT / "runs" / "quality" / f"structprune-{p}" for p in (20, 30, 50)]
TARGET = 0.9
BACKENDS = ("torch", "ort", "llamacpp-f16", "llamacpp-q8_0")


def seconds_of(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class Runner(NamedTuple):
    """One model under one backend: the three things the benchmark times. (A NamedTuple, not a
    dataclass: the module must load by path, unregistered, for `render_markdown`'s check.)"""

    prefill: Callable[[torch.Tensor], object]
    generate: Callable[[torch.Tensor, int], torch.Tensor]
    #: greedy decode owning its KV cache: (all tokens, seconds spent after the prompt's step)
    model_loop: Callable[[torch.Tensor, int], tuple[torch.Tensor, float]]


def _generate_fn(model) -> Callable[[torch.Tensor, int], torch.Tensor]:
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,  # every run makes all its tokens, without a logits processor
                pad_token_id=pad,
            )
        if out.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generate() made {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")
        return out

    return generate


def torch_runner(folder: Path) -> tuple[Runner, int]:
    from transformers import AutoModelForCausalLM

    import struprune_plugin  # noqa: F401  (registers the pruned model classes)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    last_only = (
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )

    def prefill(ids: torch.Tensor):
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), **last_only).logits

    def model_loop(prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
        with torch.inference_mode():
            mask = torch.ones_like(prompt)
            out = model(input_ids=prompt, attention_mask=mask, use_cache=True, **last_only)
            tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
                out = model(
                    input_ids=tokens[-1],
                    attention_mask=mask,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            seconds = time.perf_counter() - start
        return torch.cat([prompt, *tokens], dim=1), seconds

    params = sum(p.numel() for p in model.parameters())
    return Runner(prefill, _generate_fn(model), model_loop), params


def llamacpp_runner(folder: Path, work: Path, threads: int, outtype: str, n_ctx: int) -> tuple[Runner, int]:
    """llama.cpp through llama-cpp-python on the folder's GGUF export (`struprune export gguf`).
    Batch 1 only (the bindings decode one sequence). `generate()` is the bindings' sampling
    iterator at temperature 0 (greedy), the model loop a plain eval + argmax loop."""
    import llama_cpp
    import numpy as np

    from struprune_plugin.export.gguf_model import export_gguf

    path = export_gguf(folder, work / f"{folder.name}-{outtype}.gguf", outtype, overwrite=True).path
    llm = llama_cpp.Llama(
        str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def single(ids: torch.Tensor) -> list[int]:
        if ids.shape[0] != 1:
            raise ValueError("the llama.cpp backend decodes batch 1 only")
        return ids[0].tolist()

    def prefill(ids: torch.Tensor):
        llm.reset()
        llm.eval(single(ids))

    def generate(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        out = []
        for token in llm.generate(single(prompt), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == new_tokens:
                break
        return torch.cat([prompt, torch.tensor([out])], dim=1)

    vocab = llm.n_vocab()

    def next_token() -> int:
        # the last position's logits, read from the context (the bindings keep no copy unless
        # every position's logits are requested, which would slow prefill)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    def model_loop(prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
        llm.reset()
        llm.eval(single(prompt))
        tokens = [next_token()]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        seconds = time.perf_counter() - start
        return torch.cat([prompt, torch.tensor([tokens])], dim=1), seconds

    from struprune_plugin.checkpoint import load_pruned

    params = sum(p.numel() for p in load_pruned(folder).parameters())
    return Runner(prefill, generate, model_loop), params


def ort_runner(folder: Path, work: Path, threads: int) -> tuple[Runner, int]:
    import numpy as np
    from transformers import AutoModelForCausalLM

    import struprune_plugin  # noqa: F401
    from struprune_plugin.onnx_export import cpu_session_options, export_onnx, ort_model_class

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
    onnx_dir = work / f"{folder.name}-onnx"
    if not (onnx_dir / "model.onnx").exists():
        export_onnx(folder, onnx_dir)
    # generate() interleaves PyTorch work with session calls: no spinning. Prefill and the model
    # loop only call the session: spinning threads answer faster (see cpu_session_options).
    generating = ort_model_class().from_pretrained(onnx_dir, session_options=cpu_session_options(threads))
    model = ort_model_class().from_pretrained(
        onnx_dir, session_options=cpu_session_options(threads, spinning=True)
    )
    session = model.session
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    for name in past_names:
        if not all(isinstance(d, int) for d in inputs[name].shape[1::2]):
            raise RuntimeError(
                f"{name}: the graph does not fix its head count / head size ({inputs[name].shape})"
            )

    def prefill(ids: torch.Tensor):
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    def model_loop(prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
        ids = prompt.numpy()
        batch = ids.shape[0]
        feeds = {
            n: np.zeros((batch, inputs[n].shape[1], 0, inputs[n].shape[3]), dtype=np.float32)
            for n in past_names
        }
        if "use_cache_branch" in inputs:
            feeds["use_cache_branch"] = np.array([False])
        tokens, start, past = [], 0.0, 0
        for step in range(new_tokens):
            if step == 1:
                start = time.perf_counter()
            length = ids.shape[1]
            feeds["input_ids"] = ids
            feeds["attention_mask"] = np.ones((batch, past + length), dtype=np.int64)
            if "position_ids" in inputs:
                feeds["position_ids"] = np.broadcast_to(
                    np.arange(past, past + length, dtype=np.int64), (batch, length)
                )
            result = dict(zip(outputs, session.run(None, feeds)))
            ids = result["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(ids)
            past += length
            feeds.update({n: result[n.replace("past_key_values.", "present.")] for n in past_names})
            if "use_cache_branch" in inputs:
                feeds["use_cache_branch"] = np.array([True])
        seconds = time.perf_counter() - start
        return torch.cat([prompt, torch.from_numpy(np.concatenate(tokens, axis=1))], dim=1), seconds

    return Runner(prefill, _generate_fn(generating), model_loop), params


def measure(runners: dict[str, Runner], vocab: int, batch: int, args) -> dict[str, dict]:
    """Every model's timings at one batch size. The models take turns within each repeat, so a
    drift of the machine's speed (other tenants, clock changes) lands on all of them alike instead
    of on whichever model was measured during it; the first round is a warm-up."""
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, args.decode_prompt), generator=gen)
    long_prompt = torch.randint(0, vocab, (1, args.prefill_len), generator=gen)
    steps = args.new_tokens - 1
    times: dict[tuple[str, str], list[float]] = {}
    rounds = tqdm(range(args.repeats + 1), desc=f"batch {batch}: rounds over {len(runners)} models")
    for round_ in rounds:
        for name, runner in runners.items():
            sample = {
                "prompt_prefill": seconds_of(runner.prefill, prompt),
                "generate": seconds_of(runner.generate, prompt, args.new_tokens),
                "loop": runner.model_loop(prompt, args.new_tokens)[1],
            }
            if batch == 1:
                sample["prefill"] = seconds_of(runner.prefill, long_prompt)
            for key, value in sample.items():
                if round_:
                    times.setdefault((name, key), []).append(value)
    rows = {}
    for name, runner in runners.items():
        med = {key: statistics.median(v) for (n, key), v in times.items() if n == name}
        decode = max(med["generate"] - med["prompt_prefill"], 1e-9)
        tokens, _ = runner.model_loop(prompt, args.new_tokens)
        row: dict = {"batch": batch}
        if batch == 1:
            row.update(
                prefill_len=args.prefill_len,
                prefill_s=med["prefill"],
                prefill_tok_s=args.prefill_len / med["prefill"],
            )
        row.update(
            generate_s=med["generate"],
            generate_step_ms=1e3 * decode / steps,
            generate_tok_s=batch * steps / decode,
            loop_step_ms=1e3 * med["loop"] / steps,
            loop_tok_s=batch * steps / med["loop"],
            loop_tokens_match_generate=bool(torch.equal(tokens, runner.generate(prompt, args.new_tokens))),
            decode_prompt=args.decode_prompt,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        )
        rows[name] = row
    return rows


def checkpoint_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def _speedups(rows: list[dict], key: str) -> list[tuple[dict, float, float]]:
    """(row, speed-up over the dense row of the same backend and batch, parameter ratio)."""
    out = []
    for r in rows:
        dense = next(
            (
                d
                for d in rows
                if (d["backend"], d["batch"], d["model"]) == (r["backend"], r["batch"], "dense")
            ),
            None,
        )
        if dense is not None and key in r and key in dense:
            out.append((r, r[key] / dense[key], dense["params"] / r["params"]))
    return out


def step_fit(rows: list[dict], key: str) -> tuple[float, float] | None:
    """Least squares: ms per decode step = fixed + slope x parameters (millions)."""
    pts = [(r["params"] / 1e6, r[key]) for r in rows if key in r]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - slope * mx, slope


def _met(speedup: float, ratio: float, is_dense: bool) -> str:
    return "" if is_dense else ("yes" if speedup >= TARGET * ratio else "no")


def model_label(row: dict[str, Any]) -> str:
    """A row's model as tables name it: StructPrune rows measured under the former default say so
    (their figures predate today's default allocation)."""
    if former_default(row):
        return f"{row['model']} ({FORMER_DEFAULT})"
    return row["model"]


def _command(row: dict[str, Any]) -> str:
    command = row.get("command")
    return f"`{' '.join(command)}`" if command else "not recorded"


def _origins(order: list[dict[str, Any]]) -> list[str]:
    """Where the rows came from: per backend and run, the commit, the machine, the versions of the
    libraries that make that backend's figures, and the command line (rows that recorded one)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in order:
        libraries = libraries_of(r, BACKEND_LIBRARIES.get(r["backend"], ("torch",)))
        key = (r["backend"], results_store.short(r.get("provenance")), machine_of(r), libraries, _command(r))
        groups.setdefault(key, []).append(r)
    lines = [
        "",
        "## Where the rows came from",
        "",
        "`commit`: the code a row ran (`+`: with uncommitted changes). Library versions as each row's "
        "record names them (rows measured before that: the pins pyproject.toml held at the commit).",
        "",
        "| backend | rows | commit | machine | libraries | command |",
        "|---|---:|---|---|---|---|",
    ]
    for (backend, commit, machine, libraries, command), rows in groups.items():
        lines.append(f"| {backend} | {len(rows)} | {commit} | {machine} | {libraries} | {command} |")
    return lines


def prefill_len(row: dict[str, Any]) -> int:
    """The prefill prompt's length: recorded, or for rows measured before it was, the tokens per
    second times the seconds the row stored (the one way the figure was computed)."""
    return row.get("prefill_len") or round(row["prefill_tok_s"] * row["prefill_s"])


def _decode_setup(rows: list[dict[str, Any]]) -> str:
    """The decode prompt and new-token counts the rows recorded (joined where they differ)."""
    recorded = dict.fromkeys(
        f"{r['decode_prompt']}-token prompt, {r['new_tokens']} new greedy tokens"
        for r in rows
        if r.get("new_tokens")
    )
    missing = sum(not r.get("new_tokens") for r in rows)
    parts = list(recorded)
    if missing:
        parts.append(
            f"prompt length and new tokens not recorded for the {missing} rows measured before rows recorded them"
        )
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


def render(rows: list[dict[str, Any]], stem: str = "speed") -> str:
    """The .md of a results stem from its rows: every figure and label read from them."""
    order = sorted(rows, key=lambda r: (BACKENDS.index(r["backend"]), r["batch"], -r["params"]))
    lengths = " / ".join(dict.fromkeys(str(prefill_len(r)) for r in order if r["batch"] == 1))
    title = "# Speed benchmark (`integration/benchmark_speed.py`)"
    lines = [
        title if stem == "speed" else f"{title}: `{stem}`",
        "",
        f"CPU (torch and ort in float32). Target: speed-up >= {TARGET} x (dense / pruned parameters). Medians of the "
        "repeats; the models take turns within every repeat.",
        "",
        f"## Prefill (batch 1, {lengths}-token prompt)",
        "",
        "PyTorch and llama.cpp compute the last position's logits (as generation does); Optimum's ONNX "
        "graph computes the logits of every position. torch and ort run float32 weights; llama.cpp "
        "the GGUF type its backend names.",
        "",
        "| backend | model | params | checkpoint MiB | prefill tok/s | speed-up | params ratio | target met | commit |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r, x, ratio in _speedups([r for r in order if r["batch"] == 1], "prefill_tok_s"):
        lines.append(
            f"| {r['backend']} ({r['threads']} threads) | {model_label(r)} | {r['params']:,} | "
            f"{r['checkpoint_mib']:.0f} | {r['prefill_tok_s']:.0f}{mark(r)} | {x:.2f} | {ratio:.2f} | "
            f"{_met(x, ratio, r['model'] == 'dense')} | {results_store.short(r.get('provenance'))} |"
        )
    lines += [
        "",
        "## Decode (greedy, KV cache)",
        "",
        f"{_decode_setup(order)} `generate()`: the host's generation loop. Model loop: a greedy loop that owns the KV cache and "
        "calls the model (PyTorch forward / `InferenceSession.run`); its tokens equal `generate()`'s "
        "where the last column says so.",
        "",
        "| backend | batch | model | generate() tok/s | speed-up | model loop tok/s | speed-up | params ratio "
        "| target met: generate() / loop | same tokens | commit |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    gen = {id(r): x for r, x, _ in _speedups(order, "generate_tok_s")}
    for r, x, ratio in _speedups(order, "loop_tok_s"):
        g = gen[id(r)]
        met = "" if r["model"] == "dense" else f"{_met(g, ratio, False)} / {_met(x, ratio, False)}"
        lines.append(
            f"| {r['backend']} ({r['threads']} threads) | {r['batch']} | {model_label(r)} | "
            f"{r['generate_tok_s']:.1f}{mark(r)} | {g:.2f} | {r['loop_tok_s']:.1f}{mark(r)} | {x:.2f} | "
            f"{ratio:.2f} | {met} | {'yes' if r['loop_tokens_match_generate'] else 'NO'} | "
            f"{results_store.short(r.get('provenance'))} |"
        )
    lines += [
        "",
        "## Where a decode step's time goes",
        "",
        "Least-squares fit over the models of each configuration: ms per step = fixed + slope x "
        "parameters. The fixed part (per-token work that does not shrink with the weights: Python in "
        "the host's loop, kernel launches, attention over the cache, the unpruned embedding lookup) "
        "caps the speed-up below the parameter ratio; the slope is the weight-streaming cost.",
        "",
        "| backend | batch | loop | dense ms/step | fixed ms | ms per 1M params | fixed share of dense |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for backend, batch in sorted(
        {(r["backend"], r["batch"]) for r in order}, key=lambda k: (BACKENDS.index(k[0]), k[1])
    ):
        group = [r for r in order if (r["backend"], r["batch"]) == (backend, batch)]
        dense = next((r for r in group if r["model"] == "dense"), None)
        shared = mark(*group)
        for key, name in (("generate_step_ms", "generate()"), ("loop_step_ms", "model loop")):
            fit = step_fit(group, key)
            if fit and dense:
                fixed, slope = fit
                lines.append(
                    f"| {backend} | {batch} | {name} | {dense[key]:.1f}{mark(dense)} | {fixed:.1f}{shared} | "
                    f"{slope:.3f} | {fixed / dense[key]:.0%} |"
                )
    lines += _origins(order)
    lines += shared_note(
        order,
        "other jobs shared the machine while the row was timed (its provenance's contention record; "
        "in the fit: some row of the configuration): its speeds are lower bounds.",
    )
    return "\n".join(lines) + "\n"


def render_markdown(stem: str, data: Any) -> str:
    """The .md this script writes for `results/<stem>.json` (`speed`, or an `--out` stem such as
    `rounding_llamacpp`)."""
    return render(rows_of(data), stem)


def plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Speed-up against parameter ratio, per backend, batch and measure; the title names the
    pruned models the rows hold."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    series = [("prefill_tok_s", "prefill", "s")]
    series += [("generate_tok_s", "decode generate()", "o"), ("loop_tok_s", "decode model loop", "^")]
    top = 1.0
    for key, name, marker in series:
        for backend, batch in sorted({(r["backend"], r["batch"]) for r in rows}):
            pts = [
                (ratio, x)
                for r, x, ratio in _speedups(rows, key)
                if (r["backend"], r["batch"]) == (backend, batch) and r["model"] != "dense"
            ]
            if pts:
                pts.sort()
                top = max(top, *(p for pair in pts for p in pair))
                ax.plot(
                    *zip(*pts),
                    ls={"torch": "-", "ort": "--"}.get(backend, ":"),
                    marker=marker,
                    label=f"{backend} b{batch}: {name}",
                )
    grid = [1.0, top * 1.05]
    ax.plot(grid, grid, color="grey", lw=1, label="= parameter ratio")
    ax.plot(grid, [TARGET * g for g in grid], color="grey", lw=1, ls=":", label=f"target {TARGET} x ratio")
    ax.set(xlabel="dense / pruned parameters", ylabel="speed-up over dense")
    pruned = ", ".join(dict.fromkeys(r["model"] for r in rows if r["model"] != "dense"))
    ax.set_title(f"Speed-up over dense vs parameter ratio (CPU)\n{pruned}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def repo_path(arg: str | Path) -> str:
    """A path as rows record it: relative to the repository where it lies inside it (symlinks,
    such as a virtual environment's interpreter, are kept as named). Other arguments unchanged."""
    path = Path(arg)
    if not path.exists() and not path.is_absolute():
        return str(arg)
    try:
        return path.absolute().relative_to(ROOT).as_posix()
    except ValueError:
        return str(arg)


def command_line() -> list[str]:
    """This process's command line, interpreter first, so the .md can show how each row was made."""
    return [repo_path(sys.executable), *(repo_path(a) for a in sys.argv)]


def row_key(row: dict[str, Any]) -> tuple:
    """A stored row is replaced by a new one of the same backend, model and batch."""
    return (row["backend"], row["model"], row["batch"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--pruned", type=Path, nargs="*", default=DEFAULT_PRUNED)
    parser.add_argument(
        "--dense",
        type=Path,
        default=None,
        help="the dense folder the pruned ones are compared with (default: SmolLM2)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "speed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="stem of the .json/.md/.png results")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the stem's .md (and its plot, where one exists) from its JSON",
    )
    args = parser.parse_args()
    if args.report_only:
        rows = results_store.load_rows(args.out.with_suffix(".json"))
        results_store.write_atomic(args.out.with_suffix(".md"), render(rows, args.out.name))
        if args.out.with_suffix(".png").exists():
            plot(rows, args.out)
        return 0
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill step and one decode step)")
    if args.backend.startswith("llamacpp") and args.batch != [1]:
        parser.error("the llama.cpp backend decodes batch 1 only: pass --batch 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the plugin imports the hub
    from struprune_plugin.zoo import resolve_model

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    models = [("dense", args.dense or resolve_model("smollm2"))]
    for folder in args.pruned:
        if not (folder / "config.json").exists():
            print(f"skipping {folder}: not there (run integration/benchmark_quality.py first)")
            continue
        models.append((folder.name, folder))
    runners, params, vocab = {}, {}, None
    for name, folder in models:
        if args.backend == "torch":
            runners[name], params[name] = torch_runner(folder)
        elif args.backend.startswith("llamacpp"):
            n_ctx = max(args.prefill_len, args.decode_prompt + args.new_tokens) + 8
            outtype = args.backend.split("-", 1)[1]
            runners[name], params[name] = llamacpp_runner(folder, args.work, args.threads, outtype, n_ctx)
        else:
            runners[name], params[name] = ort_runner(folder, args.work, args.threads)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    command = command_line()
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        # One record per batch size: its rows were timed together, the models taking turns.
        with results_store.RunRecord() as record:
            measured_rows = measure(runners, vocab, batch, args)
        new_rows = []
        for name, measured in measured_rows.items():
            row = {
                "backend": args.backend,
                "model": name,
                "folder": repo_path(dict(models)[name]),
                "params": params[name],
                "checkpoint_mib": checkpoint_mib(dict(models)[name]),
                "threads": args.threads,
                **measured,
                "command": command,
                "provenance": record.provenance,
            }
            print(json.dumps({k: v for k, v in row.items() if k != "provenance"}), flush=True)
            new_rows.append(row)
        rows = results_store.store_rows(
            args.out, new_rows, key=row_key, render=lambda stored: render(stored, args.out.name)
        )
    plot(rows, args.out)
    print(render(rows, args.out.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
