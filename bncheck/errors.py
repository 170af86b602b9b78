"""Typed exceptions. The library raises these; only ``cli.py`` turns them into
one-line messages and exit codes."""


class BncheckError(Exception):
    """Base class of every error bncheck raises on purpose."""


class InputError(BncheckError):
    """The user's model, data, checkpoint or options cannot be used (exit code 2)."""


class ModelFileError(InputError):
    """model.py is missing, does not import, or lacks a factory."""


class NoNormLayersError(InputError):
    """The model has no normalization layer with running statistics."""


class DataError(InputError):
    """The data is missing, empty, malformed or has too few samples per batch."""


class ShapeMismatchError(InputError):
    """Model outputs and targets (or inputs and the model) do not fit together."""


class NonFiniteError(InputError):
    """NaN or inf found in inputs or outputs."""


class CheckpointError(InputError):
    """A checkpoint file cannot be read or does not fit the model."""


class OutputExistsError(InputError):
    """Refusing to overwrite an existing output file."""


class OutputIsInputError(InputError):
    """Refusing an output file that is one of the command's inputs (by any name or link)."""


class BackendError(InputError):
    """An optional framework (torchvision, timm, keras, lightning, safetensors) is missing or misconfigured."""


class ForwardError(InputError):
    """The model's forward pass raised on the user's data."""


class BatchNormCheckFailed(BncheckError):
    """A training-loop callback with ``on_fail="raise"`` found a discrepancy; ``report`` holds the diagnosis."""

    def __init__(self, message: str, report=None):  # report optional: exceptions are re-created from args
        super().__init__(message)
        self.report = report


def summarize(error: BaseException, limit: int = 300) -> str:
    """An exception from torch, Keras or user code as one short line: its message lines joined."""
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if len(text) > limit:
        cut = text[: limit - 3]
        text = (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "..."  # at a word boundary, not mid-word
    return text or type(error).__name__


class DistributedError(InputError):
    """The processes of a torch.distributed run could not work together (timeout, a lost process)."""


class RankFailedError(DistributedError):
    """Another process of the run failed; its message is carried here."""
