"""One measured model: built from its config with random weights by the code the hf backend trains with, its
optimizer, a random batch, and a warm-up step taken (optimizer states exist from then on)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ftplan.estimate.settings import TrainingSetup
from ftplan.model.spec import ModelSpec


@dataclass
class Session:
    model: object
    optimizer: object
    batch: dict
    setup: TrainingSetup
    device: str
    kept: dict = field(default_factory=dict)  # a custom loop's outputs, alive between steps
    micro_steps: int = 1  # gradient accumulation: micro-batches per optimizer step

    def step(self, **marks) -> float:
        from ftplan.train.build import train_step

        return train_step(self.model, self.optimizer, self.batch, self.setup, self.device, kept=self.kept,
                          micro_steps=self.micro_steps, **marks)

    def resident_tensors(self):
        """What lives between steps: parameters, buffers, quantization state, optimizer states, kept outputs."""
        from ftplan.measure.memtrack import resident_tensors, tensors_of

        yield from resident_tensors(self.model, self.optimizer)
        outputs = self.kept.get("outputs")
        if outputs is not None:
            yield from tensors_of(dict(outputs))


def nbytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def prepare(spec: ModelSpec, setup: TrainingSetup, device: str, seed: int = 0, micro_steps: int = 1) -> Session:
    """Build, warm up, and return the session (each step accumulating over `micro_steps` micro-batches)."""
    import torch

    from ftplan.train.build import build_model, build_optimizer, random_batch

    torch.manual_seed(seed)
    model = build_model(spec, setup, device=device)
    session = Session(model=model, optimizer=build_optimizer(model, setup),
                      batch=random_batch(spec.dims.vocab, setup, device), setup=setup, device=device,
                      micro_steps=micro_steps)
    session.step()  # warm-up: optimizer states exist from here on
    return session
