"""Healing: win back a pruned model's quality by training it to reproduce its dense teacher."""

from .layerwise import LayerHealRecord, LayerwiseHealConfig, heal_layerwise

__all__ = ["LayerHealRecord", "LayerwiseHealConfig", "heal_layerwise"]
