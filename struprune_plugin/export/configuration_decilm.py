"""The config of a pruned model in the DeciLM (Nemotron-NAS) layout, as vLLM's `DeciLMForCausalLM`
reads it: a Llama config plus `block_configs`, one entry per decoder layer with its K/V head
grouping (`attention.n_heads_in_group`) and its MLP width (`ffn.intermediate_size`).

vLLM reads the entries by attribute (`block.attention.no_op`, `hasattr(block.ffn, "ffn_mult")`),
so each entry is a dict whose keys are also attributes; a key that is absent is an absent
attribute (vLLM takes `ffn_mult` over `intermediate_size` whenever the attribute exists, so this
file never invents one). struprune copies this file next to the exported weights with an
`auto_map`, so `vllm serve FOLDER --trust-remote-code` (or `AutoConfig.from_pretrained(FOLDER,
trust_remote_code=True)`) builds it without struprune installed. Self-contained: transformers only,
4.5x or 5.
"""

from __future__ import annotations

from transformers import LlamaConfig


class BlockField(dict):
    """A dict whose keys read as attributes too (missing ones raise AttributeError, so hasattr works)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _fields(value):
    if isinstance(value, dict):
        return BlockField({k: _fields(v) for k, v in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    @property
    def block_configs(self) -> list[BlockField]:
        return self.__dict__.get("block_configs", [])

    @block_configs.setter
    def block_configs(self, value) -> None:
        # A data descriptor wins over the instance dict, so transformers' own setattr of the
        # config.json key lands here (in 4.5x's __init__ and 5's __post_init__ alike).
        self.__dict__["block_configs"] = [_fields(block) for block in value or []]
