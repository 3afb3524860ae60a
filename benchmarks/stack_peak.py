"""Peak of the tensors one LoRA training step creates, under whatever transformers and peft this python has: to tell
how far a library version moves the peak that ftplan's estimate (transformers 5) predicts.

Mistral-7B's width at 2 layers (random weights, bf16, no autocast), LoRA r16 on q, k, v and o with PEFT's default
fp32 adapters, gradient checkpointing as the model enables it by default, and the Trainer's step (the outputs dropped
before backward). Counted by ftplan's live-tensor tracker (planner/measure/memtrack.py, loaded by path so that an
older stack needs only torch): prints the peak, per token, and the op where it was reached.

    python benchmarks/stack_peak.py 2 512                # this venv (transformers 5)
    python -m venv /tmp/v448 && /tmp/v448/bin/pip install transformers==4.48.1 peft==0.13.2 accelerate==1.0.1
    /tmp/v448/bin/python benchmarks/stack_peak.py 2 512  # the stack of fms-acceleration's published runs

Measured 2026-12-02 (torch 2.13/2.14 CPU): at 2 x 512 tokens 1492.5 MiB (transformers 5.17, peft 0.21.2, peak in
the loss's backward) against 1562.5 MiB (4.48.1, peft 0.13.2, peak in the loss's forward); at 4 x 512, 1899.5 against
2039.6 MiB: 70 KiB per token. benchmarks/MEMORY-PUBLISHED.md uses it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def tracker_class():
    """ftplan's LiveBytes, extended to remember the op at which the peak was reached."""
    path = Path(__file__).resolve().parents[1] / "planner" / "measure" / "memtrack.py"
    spec = importlib.util.spec_from_file_location("memtrack", path)
    memtrack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memtrack)

    class PeakAt(memtrack.LiveBytes):
        at = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.peak
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.peak > before:
                self.at = str(func)
            return out
    return PeakAt


def lora_model():
    """Mistral-7B's width, 2 layers, LoRA r16 on the attention projections, checkpointing on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    return model


def main() -> None:
    """One warm-up step, then one counted step of `batch` x `tokens`."""
    import peft
    import torch
    import transformers

    batch, tokens = int(sys.argv[1]), int(sys.argv[2])
    model = lora_model()
    ids = torch.randint(0, 32000, (batch, tokens))

    def step():
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        del out  # the Trainer keeps only the loss
        loss.backward()

    step()
    for p in model.parameters():
        p.grad = None
    tracker = tracker_class()()
    with tracker:
        step()
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, {batch} x {tokens} tokens: peak of the "
          f"step's tensors {tracker.peak / 2**20:.1f} MiB ({tracker.peak / (batch * tokens) / 1024:.1f} KiB per "
          f"token), reached in {tracker.at}")


if __name__ == "__main__":
    main()
