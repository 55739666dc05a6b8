"""Typed errors of moe-fx.

Every error a user can cause by bad input is a :class:`MoeFxError`: the CLI prints its message as one line
and exits with status 2, so the message must name the bad input and say what to do about it.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its type's name when it has none), cut to ``limit`` characters:
    what a one-line error quoting a library's failure shows of it."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class MoeFxError(Exception):
    """Base class for errors caused by the user's input (path, model, data, option)."""


class NotAModelError(MoeFxError):
    """The path is missing or holds no loadable transformers checkpoint."""


class NotMoEError(MoeFxError):
    """The model has no block with routed experts."""


class UnsupportedFamilyError(MoeFxError):
    """The model has routed experts in a layout moe-fx cannot rewrite."""


class BadOptionError(MoeFxError):
    """An option value is out of range or inconsistent with the model."""


class CalibrationDataError(MoeFxError):
    """Calibration or evaluation data is missing, unreadable or empty."""


class OutputPathError(MoeFxError):
    """The output path would overwrite the source or an existing directory."""


class PassOrderError(MoeFxError):
    """A pass ran before the pass that produces what it needs (e.g. Score before Calibrate)."""


class HostMemoryError(MoeFxError):
    """What a run would keep in CPU memory is more than the machine has available; said before the run starts."""


class DeviceMemoryError(MoeFxError):
    """The device ran out of memory; the message gives the numbers and the options that lower the need."""


def out_of_memory(stage: str, device, batch: tuple[int, ...], fix: str) -> DeviceMemoryError:
    """A one-line :class:`DeviceMemoryError` for ``torch.OutOfMemoryError`` during ``stage`` on ``device`` with a
    batch of shape ``batch``: the memory the device had (free, total, the peak this process allocated) and ``fix``."""
    import torch

    numbers = ""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        numbers = (f" ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB; this process peaked at "
                   f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)")
    shape = " x ".join(map(str, batch))
    return DeviceMemoryError(f"{stage} ran out of memory on {device} with a batch of {shape} tokens{numbers}: {fix}")
