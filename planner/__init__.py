"""ftplan's core: exact parameter counts, memory, instances and plans for LLM fine-tuning.

Importing this package must stay cheap: no torch, transformers, peft or bitsandbytes here.
"""

__version__ = "0.1.0"
