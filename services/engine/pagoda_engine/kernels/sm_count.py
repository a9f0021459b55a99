"""The number of SMs that kernels size their grids by."""

from __future__ import annotations

import functools

import torch

DEFAULT_NUM_SMS = 132  # H100 SXM; used for CPU tensors under the Triton interpreter


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
