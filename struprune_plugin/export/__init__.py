"""Writers that turn a saved (pruned or dense) model folder into the formats serving engines load."""
