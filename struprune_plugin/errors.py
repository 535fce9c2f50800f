"""Errors raised for bad input. Each message names the problem and how to fix it."""

from __future__ import annotations


def is_number(value: object) -> bool:
    """An int or float that is not a bool: Python's True is the int 1, so `isinstance(True, int)`
    would let `depth_prior=true` in a recipe pass as a weight of 1 instead of being refused."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StructPruneError(ValueError):
    """Base class: every user-facing error of the plugin derives from it."""


class UnsupportedArchitectureError(StructPruneError):
    """The model has no recognisable decoder layers, attention or MLP modules."""


class InvalidSparsityError(StructPruneError):
    """A requested sparsity (or ratio) lies outside its valid range."""


class CalibrationDataError(StructPruneError):
    """Calibration or evaluation text is empty, too short, or malformed."""


class NonFiniteActivationError(StructPruneError):
    """NaN or inf appeared in the activations that drive pruning decisions."""


class GQAConstraintError(StructPruneError):
    """A head-pruning request that grouped-query attention cannot honour."""


class WidthConstraintError(StructPruneError):
    """A width rounding (MLP widths as multiples of N) that the model's widths cannot honour."""


class OutputExistsError(StructPruneError):
    """The output folder exists and overwriting was not asked for."""


class OutputBusyError(OutputExistsError):
    """Another live struprune run is writing the same output right now."""


class LayoutMismatchError(StructPruneError):
    """A checkpoint's weights do not match the per-layer layout its config records."""


class DataIntegrityError(StructPruneError):
    """A cached model or text file does not match its recorded checksum."""


class OutputPathError(StructPruneError):
    """An output path that cannot be written, or whose writing would destroy other data."""


class CheckpointError(StructPruneError):
    """A model folder that cannot be read as it is: unreadable weights, missing files, a config that
    contradicts its own layout or weights, or a file type that is never loaded (pickles)."""


class DeviceError(StructPruneError):
    """A compute device that this torch build or machine does not have."""


class BudgetMissedError(StructPruneError):
    """The requested sparsity cannot be reached (or was missed) under the chosen units and limits."""


class NonFiniteWeightError(StructPruneError):
    """NaN or inf in the model's own weights: no pruning decision or saved model can be trusted."""


def first_line(err: BaseException) -> str:
    """Library messages run to many lines; an error of ours is one line (the cause stays chained)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class RecipeError(StructPruneError):
    """An llm-compressor recipe entry for StructPruneModifier that would be skipped or misread: a stage
    or group key without llm-compressor's `_stage` / `_modifiers` suffix (dropped without a word, so a
    dense model is saved as if pruned), or a setting the modifier does not have."""


class DistributedSetupError(StructPruneError):
    """Launcher variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that cannot form a
    process group, or peers that never joined it: refused up front, since torch itself would wait
    for the missing processes for half an hour without a word."""
