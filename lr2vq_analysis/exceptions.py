"""The exceptions this package raises on purpose, in one public place.

Every error derives from :class:`LR2VQError`, so ``except LR2VQError`` catches all of them. Each also
derives from the built-in exception a Python user would expect (``ValueError`` for a bad argument,
``OSError`` for a bad file, ``RuntimeError`` for a call in the wrong state), so existing ``except``
clauses keep working.

The command line maps them to exit codes: :class:`UsageError` subclasses (a wrong argument, a
target that cannot be reached) exit 2, every other :class:`LR2VQError` exits 1.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CompressedFileError",
    "DataFileError",
    "InvalidParameterError",
    "InvalidWeightsError",
    "LR2VQError",
    "NonFiniteError",
    "NotFittedError",
    "ReportFileError",
    "ResumeMismatchError",
    "StateError",
    "UnreachableTargetError",
    "UsageError",
    "WeightFileError",
]


class LR2VQError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(LR2VQError, ValueError):
    """The caller asked for something that is not allowed (the command line exits 2)."""


class InvalidParameterError(UsageError):
    """A parameter (k, m, d̃, ρ, a plan entry, an option, ...) is outside its allowed range."""


class UnreachableTargetError(InvalidParameterError):
    """A size or ratio target lies outside the range the candidate plans can reach."""


class ResumeMismatchError(UsageError):
    """A checkpoint was written by a run whose configuration differs from the one resuming it."""


class InvalidWeightsError(LR2VQError, ValueError):
    """A weight tensor cannot be analysed: wrong rank, NaN/Inf values, empty model."""


class NonFiniteError(LR2VQError, FloatingPointError):
    """A computation produced NaN/Inf (a training loss, a gradient, an fp16 value out of range)."""


class StateError(LR2VQError, RuntimeError):
    """An object was used in a state that does not allow the call (e.g. exporting an unquantized layer)."""


class NotFittedError(StateError, AttributeError):
    """A fitted attribute or method was used before the object was fitted."""


class DataFileError(LR2VQError, OSError):
    """A file is missing, not a regular file, of an unsupported format, too large, or corrupt."""


class WeightFileError(DataFileError):
    """A weight file (.pt/.pth/.bin/.safetensors/.npz, sharded index) cannot be read."""


class ReportFileError(DataFileError):
    """A report (report.json/.npz), plan (plan.json) or results file (CSV) cannot be read or written."""


class CompressedFileError(WeightFileError):
    """A compressed ``.lr2vq`` file is damaged, tampered with, or not one this version can read."""


class CheckpointError(DataFileError):
    """A fine-tuning checkpoint is damaged, tampered with, or cannot be written."""
