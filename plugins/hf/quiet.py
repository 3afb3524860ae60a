"""Library messages that say nothing to someone running ftplan, silenced once per process.

Each is named with what it means, so silencing hides no decision: ftplan's own notes say what matters."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# bitsandbytes tries an optional CPU kernel from the Hub ('kernels' package) at import on CPUs with AVX512-BF16,
# and logs every time it is absent; it then uses its own CPU kernel (slower, CPU only; CUDA runs never use it).
BNB_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward"
# DeepSpeed, once installed, is imported by accelerate even in runs that do not use it, and its logger writes to
# stdout - where `ftplan run --json` writes its summary. On a machine without a GPU its first record says it
# found none, which ftplan's own note already says.
DEEPSPEED_NO_GPU = "Setting accelerator to CPU"


class _ToStderr(logging.Filter):
    """DeepSpeed's records on stderr instead of stdout (dropped from its own handler), but the no-GPU one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(DEEPSPEED_NO_GPU):
            print(f"deepspeed: {record.getMessage()}", file=sys.stderr)
        return False


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_libraries() -> None:
    """Install the filters (idempotent). Called before the libraries are imported, so their first messages go too."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the same object the library fetches later
    if not any(isinstance(f, _DropPrefix) for f in cpu_ops.filters):
        cpu_ops.addFilter(_DropPrefix(BNB_CPU_KERNEL))
    deepspeed = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils.logging configures at import
    if not any(isinstance(f, _ToStderr) for f in deepspeed.filters):
        deepspeed.addFilter(_ToStderr())
    # transformers/peft/accelerate deprecation notices address the code calling them (ftplan's), not its user
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    # on a CPU bitsandbytes' paged optimizers page nothing (there is no GPU memory to page from): same figures
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)


@contextmanager
def no_save_bar() -> Iterator[None]:
    """Without transformers' "Writing model shards" bar: it draws over ftplan's own display at the end of every
    run, for a save that takes a moment. Downloads keep their bars (they are not drawn inside this block)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
