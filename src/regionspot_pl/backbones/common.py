"""What every user of the frozen backbones shares: their errors, the autocast precision they run
at, and where text embeddings are cached by default. Extraction, ``test`` and the predictor
import these from here, so no command imports another command's module."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from ..errors import RegionSpotError

# The HDF5 file of CLIP text embeddings that extraction writes and the predictor reads.
DEFAULT_TEXT_CACHE = "cache/text_embeddings.h5"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackboneError(RegionSpotError, ValueError):
    """A SAM checkpoint or a CLIP folder is not the one asked for (wrong type, unreadable)."""


class BackboneNotFoundError(BackboneError, FileNotFoundError):
    """A SAM checkpoint or a CLIP folder does not exist."""


class DeviceError(RegionSpotError, ValueError):
    """A --device that is no device, or one this machine does not have."""


def frozen_with_weights(
    model: torch.nn.Module, state: dict | None, checkpoint: object, sam_type: str
) -> torch.nn.Module:
    """``model`` with ``state`` loaded (None: its random initialization), in eval mode and with
    ``requires_grad`` off; a state that does not fit is a :class:`BackboneError` naming the file."""
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise BackboneError(f"checkpoint {str(checkpoint)!r} does not fit --sam_type {sam_type}: {err}") from None
    model.eval()
    model.requires_grad_(False)
    return model


def resolve_device(device: str | None) -> torch.device:
    """The one reading of ``--device``: 'auto' (or None) is cuda when there is one, else cpu; a
    named device must parse and exist on this machine."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device!r} is not a device: pass auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            have = "no CUDA device is available" if count == 0 else f"this machine has cuda:0..cuda:{count - 1}"
            raise DeviceError(f"--device {device}: {have}; pass --device cpu or one of its GPUs")
    elif resolved.type != "cpu":
        raise DeviceError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return resolved


def resolved_precision(device: torch.device, precision: str) -> str:
    """The precision ``auto`` stands for on this device: bf16 where the card has it, fp16 on
    others (V100), fp32 on CPU. The one reading of 'auto': extraction records it in the manifest
    (shards of one folder share it), the predictor autocasts at it, fit trains at its mixed form."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast at ``resolved_precision(device, precision)``; no autocast for fp32."""
    precision = resolved_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])
