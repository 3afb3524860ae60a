"""Peak of the tensors one LoRA training step creates, under whatever transformers and peft this python has: to tell
how far a library version moves the peak that ftplan's estimate (transformers 5) predicts.

Mistral-7B's width at 2 layers (random weights, bf16, no autocast), LoRA r16 on q, k, v and o with PEFT's default
fp32 adapters, gradient checkpointing as the model enables it by default, and the Trainer's step (the outputs dropped
before backward). Counted by ftplan's live-tensor tracker (planner/measure/memtrack.py, loaded by path so that an
older stack needs only torch): prints the peak, per token, and the op where it was reached.

    python benchmarks/stack_peak.py 2 512                # this venv (transformers 5)
    python -m venv /tmp/v448 && /tmp/v448/bin/pip install transformers==4.48.1 peft==0.13.2 accelerate==1.0.1
    /tmp/v448/bin/python benchmarks/stack_peak.py 2 512  # the stack of fms-acceleration's published runs
    python benchmarks/stack_peak.py 8 512 gptbigcode-full

A third argument, gptbigcode-full, runs SantaCoder's width (GPTBigCode, multi-query attention) at 2 layers, full
fine-tuning, bf16, checkpointing, the same step.

Measured 2026-12-02 (torch 2.13/2.14 CPU), transformers 5.17 + peft 0.21.2 against 4.48.1 + peft 0.13.2:
- mistral-lora: 1492.5 against 1562.5 MiB at 2 x 512 tokens, 1899.5 against 2039.6 at 4 x 512 (the 4.48.1 peak in
  the loss's forward, 5.17's in its backward): 70 KiB per token higher under 4.48.1.
- gptbigcode-full at 8 x 512: 2744.5 against 1628.6 MiB (both peaks in the loss): 279 KiB per token lower under
  4.48.1, whose GPTBigCode takes its loss on the bf16 logits.
benchmarks/MEMORY-PUBLISHED.md cites both (published_runs.jsonl known_cause).
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
    return model, config.vocab_size


def gptbigcode_model():
    """SantaCoder's width (GPTBigCode, multi-query attention), 2 layers, full fine-tuning, checkpointing on."""
    import torch
    from transformers import AutoModelForCausalLM, GPTBigCodeConfig

    config = GPTBigCodeConfig(n_embd=2048, n_inner=8192, n_layer=2, n_head=16, multi_query=True, vocab_size=49280,
                              n_positions=2048)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    return model, config.vocab_size


MODELS = {"mistral-lora": lora_model, "gptbigcode-full": gptbigcode_model}


def main() -> None:
    """One warm-up step, then one counted step of `batch` x `tokens` of the model named third (mistral-lora)."""
    import peft
    import torch
    import transformers

    batch, tokens = int(sys.argv[1]), int(sys.argv[2])
    which = sys.argv[3] if len(sys.argv) > 3 else "mistral-lora"
    model, vocab = MODELS[which]()
    ids = torch.randint(0, vocab, (batch, tokens))

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
    print(f"{which}: transformers {transformers.__version__}, peft {peft.__version__}, {batch} x {tokens} tokens: "
          "peak of the "
          f"step's tensors {tracker.peak / 2**20:.1f} MiB ({tracker.peak / (batch * tokens) / 1024:.1f} KiB per "
          f"token), reached in {tracker.at}")


if __name__ == "__main__":
    main()
