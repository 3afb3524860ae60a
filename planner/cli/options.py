"""Shared option decorators and argument parsing for the commands. Click only: no core imports beyond
the settings vocabulary, so every command module can use them without cycles."""

from __future__ import annotations

import math
from pathlib import Path

import click
from pydantic import ValidationError

from ftplan.errors import PlannerError
from ftplan.estimate.settings import (
    ATTENTION_ALIASES,
    ATTENTIONS,
    LOOPS,
    OPTIMIZER_ALIASES,
    OPTIMIZERS,
    PRECISION_HELP,
    PRECISIONS,
    LoraSettings,
    SetupChoices,
)


def console():
    """The terminal console (rich is imported only by the render layer, and only when a table is shown)."""
    from ftplan.render.console import make_console

    return make_console()


def validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", str(exc)).removeprefix("Value error, ")
    return f"{where}: {msg}" if where and where not in msg else msg


def _targets(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise PlannerError("--lora-targets is empty; pass names such as q_proj,v_proj or all-linear")
    return names


def setting_options(*, search: bool = False):
    """The method and setting flags shared by estimate, measure and recommend.

    With `search`, micro-batch, optimizer and checkpointing default to None: recommend searches them.
    """
    batch_help = "micro-batch per GPU (sequences)" + (" [default: searched]" if search else "")
    options = [
        click.option("--batch-size", type=int, default=None if search else 1, show_default=not search,
                     help=batch_help),
        click.option("--seq-len", type=int, default=2048, show_default=True, help="tokens per sequence"),
        click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank"),
        click.option("--lora-alpha", type=int, default=32, show_default=True, help="LoRA alpha"),
        click.option("--lora-dropout", type=float, default=None,
                     help="LoRA dropout [default: 0.05; 0 where PEFT adapts fused MoE parameters (all-linear on "
                          "Mixtral), whose ParamWrapper takes none]"),
        click.option("--lora-targets", default=None,
                     help="comma-separated module names, or all-linear [default: " +
                          ("searched: PEFT's default and all-linear]" if search else "PEFT's default for the model]")),
        click.option("--optimizer", type=click.Choice([*OPTIMIZERS, *OPTIMIZER_ALIASES]), default=None,
                     help="as TrainingArguments.optim names it (adamw, adamw_8bit: older names) [default: "
                          + ("searched" if search else "adamw_torch_fused") + "; paged_adamw_32bit for qlora]"),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="; ".join(f"{k}: {v}" for k, v in PRECISION_HELP.items())
                          + " [default: bf16-mixed; fp16 on GPUs without bf16]"),
        click.option("--grad-ckpt/--no-grad-ckpt", default=None,
                     help="gradient checkpointing [default: " + ("searched" if search else "on for qlora") + "]"),
        click.option("--attn", type=click.Choice([*ATTENTIONS, *ATTENTION_ALIASES]), default=None,
                     help="attention implementation, as transformers names it [default: what transformers uses "
                          "for the model: sdpa, eager for bloom]"),
        click.option("--loop", type=click.Choice(LOOPS), default="trainer", show_default=True,
                     help="trainer: the Hugging Face Trainer's step (only the loss outlives the forward); custom: "
                          "a plain PyTorch/accelerate loop (outputs = model(**batch) keeps the logits to the next "
                          "forward)"),
        click.option("--tf32/--no-tf32", default=False, show_default=True,
                     help="fp32 matmuls on TF32 tensor cores, as TrainingArguments(tf32=True) (only --precision "
                          "fp32 has fp32 matmuls; NVIDIA's NGC PyTorch images turn it on)"),
        click.option("--quant", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True,
                     help="qlora 4-bit type"),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True,
                     help="qlora double quantization of the absmax constants"),
    ]

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def load_plugin_catalog() -> None:
    """Merge plugins' catalog entries (models, GPUs, instances); loads plugins once."""
    from ftplan.run.registry import registry

    registry()


def with_plugin_catalog(lookup):
    """Run `lookup`; if a name is not in the bundled catalog, load the plugins' entries and try again.
    Keeps plugin loading (an entry-point scan) off the estimate path unless it is needed."""
    try:
        return lookup()
    except PlannerError:
        from ftplan.run.registry import registry  # imports pluggy: only on a miss

        if registry.cache_info().currsize:
            raise
        registry()
        return lookup()


def choices_from(kw: dict) -> SetupChoices:
    """The SetupChoices named by the shared setting options (removed from `kw`)."""
    dropout = kw.pop("lora_dropout")  # left out when not given: LoraSettings knows it is a default (fit_dropout)
    lora = LoraSettings(r=kw.pop("lora_r"), alpha=kw.pop("lora_alpha"), targets=_targets(kw.pop("lora_targets")),
                        **({} if dropout is None else {"dropout": dropout}))
    batch = kw.pop("batch_size")
    return SetupChoices(batch_size=batch if batch is not None else 1, seq_len=kw.pop("seq_len"),
                        precision=kw.pop("precision"),
                        optimizer=kw.pop("optimizer"), grad_ckpt=kw.pop("grad_ckpt"), attention=kw.pop("attn"),
                        loop=kw.pop("loop"), tf32=kw.pop("tf32"), lora=lora, quant_type=kw.pop("quant"),
                        double_quant=kw.pop("double_quant"))


class TokenCount(click.ParamType):
    """A token count: 20000000, 20M, 1.5B or 500k."""

    name = "tokens"
    SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace("_", "").replace(",", "")
        scale = self.SUFFIXES.get(text[-1:], 1)
        try:
            number = float(text[:-1] if scale > 1 else text)
        except ValueError:
            self.fail(f"'{value}' is not a token count; write e.g. 20000000, 20M or 1.5B", param, ctx)
        if not math.isfinite(number) or number <= 0 or number * scale > 10**15:
            self.fail(f"'{value}' must be a positive token count below 10^15", param, ctx)
        return int(number * scale)


class MemorySize(click.ParamType):
    """A memory size: 24GiB, 24GB (10^9 bytes), 24576MiB, or a plain number of GiB."""

    name = "size"
    UNITS = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 10**12, "gb": 10**9, "mb": 10**6, "": 2**30}

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "").replace(",", "")
        number, unit = text.rstrip("abcdefghijklmnopqrstuvwxyz"), text.lstrip("0123456789.")
        try:
            size = float(number) * self.UNITS[unit]
        except (ValueError, KeyError):
            self.fail(f"'{value}' is not a memory size; write e.g. 24GiB, 24GB or 24576MiB", param, ctx)
        if not math.isfinite(size) or not 2**20 <= size <= 2**50:
            self.fail(f"'{value}' is not a GPU memory size; write e.g. 24GiB", param, ctx)
        return int(size)


def plot_option(what: str):
    """--plot FILE.svg|png for `what`; the suffix is checked before any work is done."""
    def check(ctx, param, value):  # noqa: ANN001 - click's callback signature
        if value is not None and value.suffix.lower() not in (".svg", ".png"):
            raise click.BadParameter(f"'{value}': write a .svg or a .png file", ctx, param)
        return value
    return click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=check,
                        help=f"also draw {what} into FILE.svg (FILE.png with cairosvg installed)")


# --device is one choice list wherever it appears (estimate, measure, run): a user learns it once
DEVICES = ("auto", "cuda", "cpu")


def split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def key_values(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PlannerError(f"--option '{pair}' must look like KEY=VALUE")
        out[key.strip()] = value
    return out
