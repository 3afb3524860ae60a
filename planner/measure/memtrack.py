"""Live tensor bytes on the CPU, the way `torch.cuda.max_memory_allocated()` sees them on a GPU.

A TorchDispatchMode sees every tensor an operator returns; each new storage is counted once
when it appears and subtracted when its memory is freed (a finalizer on the storage). Tensors
that exist before tracking starts (parameters, buffers, optimizer states, quantization
constants) are registered explicitly.
"""

from __future__ import annotations

import weakref

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Counts live storage bytes; `peak` is the high-water mark since the last `reset_peak`."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor) -> None:
        """Count `tensor`'s storage if it is not counted yet (CPU storages only)."""
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        if self._live.get(key) == size:
            del self._live[key]
            self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.track(tensor)
        return out


def tensors_of(obj, depth: int = 0):
    """Tensors held in the attributes of `obj` (bitsandbytes QuantState, optimizer state dicts)."""
    import torch

    if depth > 3:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_of(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_of(value, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("bitsandbytes"):
        yield from tensors_of(vars(obj), depth + 1)


def resident_tensors(model, optimizer=None):
    """Everything a training step keeps between steps: parameters, buffers, quantization state,
    gradients if any, and (given the optimizer) its states."""
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
        yield from tensors_of(getattr(p, "quant_state", None))
    yield from model.buffers()
    if optimizer is not None:
        yield from tensors_of(optimizer.state)
