"""Reading a float image's value range: [0,1] or [-1,1], from evidence overshoot cannot fake.

A float tensor or array does not say its range. A declared range always wins; with
`value_range="auto"` each object the caller passed is read from its lowest finite value (see
SIGNED_EVIDENCE), and an object that could be either is judged under both readings
(docs/threat-model.md, "Range reading"). Everything here runs on the tensors' own device, with
no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# A float value this far beyond its range (in [0,1] units) is not overshoot but a wrong range,
# e.g. 0-255 floats: the image is not judged. A VAE's decoded [-1,1] output overshoots by a
# few tenths (a tiny random one by 0.5: [-1.22, 1.53]); 0-255 floats reach 2 at value 2.
RANGE_SLACK = 1.0
# Auto range: a float object is read as [-1,1] only on evidence overshoot cannot fake, a finite
# value at or below -SIGNED_EVIDENCE. Overshoot is a fraction of the range: the tiny random VAE
# of the tests decodes to [-1.22, 1.53], so a [0,1] image made of such output without clamping,
# (x+1)/2, dips to -0.11, and would dip to -0.27 if it overshot as far below as above; real
# VAEs and upscalers overshoot less. The band is about twice that. An object whose lowest value
# lies in (-SIGNED_EVIDENCE, 0) is ambiguous (a [0,1] image that overshot, or a bright [-1,1]
# image): it is judged under both readings and the most severe result is taken. An object with
# no value below 0 reads as [0,1].
SIGNED_EVIDENCE = 0.5
READINGS = ("0,1", "-1,1", "both")  # Decision.value_range: how a float input was read
NON_FINITE_INPUT = "the input image holds NaN or infinite values"
OUT_OF_RANGE_INPUT = (
    "the input image holds float values far outside [0,1] and [-1,1] "
    "(0-255 floats? pass uint8, or divide by 255)"
)


def finite_min(part: torch.Tensor | np.ndarray) -> torch.Tensor:
    """0-d tensor: the lowest finite value (+inf when there is none); NaN and -inf, which are
    refused anyway, must not decide a range. On the device, no host sync."""
    if part.size == 0 if isinstance(part, np.ndarray) else part.numel() == 0:
        device = part.device if isinstance(part, torch.Tensor) else "cpu"
        return torch.tensor(float("inf"), device=device)
    if isinstance(part, np.ndarray):
        return torch.tensor(float(np.where(part > -np.inf, part, np.inf).min()))
    return torch.where(part > float("-inf"), part, float("inf")).amin()


def auto_reading(lowest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signed, ambiguous), 0-d bools, from an object's lowest finite value (SIGNED_EVIDENCE)."""
    signed = lowest <= -SIGNED_EVIDENCE
    return signed, (lowest < 0) & ~signed


def float_to_unit(
    part: torch.Tensor, sign: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float [n,3,H,W] -> (our [0,1] copy, [n] non-finite, [n] out of range), in one copy."""
    x = part.to(device=device, dtype=dtype, copy=True)
    bad = ~torch.isfinite(x).flatten(1).all(1)  # [n]
    x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    x.mul_(torch.where(sign, 0.5, 1.0)).add_(torch.where(sign, 0.5, 0.0))
    far = ((x < -RANGE_SLACK) | (x > 1 + RANGE_SLACK)).flatten(1).any(1)  # [n]
    return x.clamp_(0, 1), bad, far


def reading_names(
    floats: Sequence[bool], signed: Sequence[bool], ambiguous: Sequence[bool]
) -> list[str | None]:
    """Per image, READINGS' name of how it was read (None: not a float input)."""
    return [
        (READINGS[2] if both else READINGS[1] if sign else READINGS[0]) if is_float else None
        for is_float, sign, both in zip(floats, signed, ambiguous, strict=True)
    ]
