"""The published runs of benchmarks/published_runs.jsonl as ftplan objects, and ftplan's prediction of each.

Every modelling decision about a run (layout, LoRA targets, sharding, tokens per micro-batch, a corrected
measurement, modules_to_save, whether it is used at all) is written in the JSONL next to the source's own
words; this module only turns those fields into a layout, a TrainingSetup, a GPU, an instance and a measured
number of seconds per optimizer step, and assembles the step the way `recommend` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.estimate.compute import FlopsPerToken, flops_per_token
from ftplan.estimate.memory import MemoryBreakdown, estimate_memory
from ftplan.estimate.params import ParamCounts, count_params
from ftplan.estimate.settings import LoraSettings, SetupChoices, TrainingSetup, resolve
from ftplan.estimate.timing import Parallel, StepTime, step_time
from ftplan.model import inventory
from ftplan.model.layout import ModelLayout
from ftplan.model.resolve import from_catalog
from ftplan.model.spec import spec_from_config

RUNS_JSONL = Path(__file__).resolve().parent / "published_runs.jsonl"
# Blocks of runs collected after a model was fixed, blind to its predictions: each tested the model of its day
# and is named by the split its runs carry (fresh-1 tested the model of 6a21d4f and is fitted since v2).
FRESH_SPLITS = ("fresh-1", "fresh-2", "fresh-3", "fresh-4")
REQUIRED = ("id", "source", "source_title", "quoted", "model", "method", "gpu", "gpus_per_node", "nodes", "seq_len",
            "micro_batch", "grad_accum", "grad_ckpt", "precision", "sharding", "measured", "time_basis", "split")
# The closest EC2 type of each GPU gives a run its interconnect and network; its GPU count becomes the run's.
BASE_INSTANCE = {"A100-80GB": "p4de.24xlarge", "A100-40GB": "p4d.24xlarge", "H100": "p5.48xlarge",
                 "H200": "p5e.48xlarge", "B200": "p6-b200.48xlarge", "V100-32GB": "p3dn.24xlarge",
                 "L40S": "g6e.48xlarge", "RTX 4090": "g6e.xlarge", "RTX A6000": "g6e.xlarge",
                 "RTX 6000 Ada": "g6e.xlarge", "RTX 3090": "g6e.xlarge", "H100 HBM2e 500W": "p5.48xlarge"}
BY_GPUS_PER_NODE = {"L4": {1: "g6.2xlarge", 4: "g6.12xlarge", 8: "g6.48xlarge"},
                    "A10G": {1: "g5.2xlarge", 4: "g5.12xlarge", 8: "g5.48xlarge"}}
WORKSTATION = ("RTX 4090", "RTX A6000", "RTX 6000 Ada", "RTX 3090")  # desktop boxes: PCIe, no fabric


@dataclass
class Case:
    """One published run, ready to predict."""

    rec: dict
    layout: ModelLayout
    setup: TrainingSetup
    counts: ParamCounts
    gpu: catalog.Gpu
    parallel: Parallel
    accum: int
    tokens_per_sequence: float
    measured_seconds: float
    published_seconds: float
    memory: MemoryBreakdown | None = None
    flops: FlopsPerToken | None = None

    @property
    def id(self) -> str:
        return self.rec["id"]

    @property
    def split(self) -> str:
        return self.rec["split"]

    @property
    def used(self) -> bool:
        return bool(self.rec["use"])

    @property
    def tokens_per_micro_batch(self) -> float:
        return self.setup.batch_size * self.tokens_per_sequence


def records(path: Path = RUNS_JSONL) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def inline_gpus(recs: list[dict]) -> dict[str, catalog.Gpu]:
    """GPUs the file defines itself (not in catalogs/gpus.json), by name."""
    fields = catalog.Gpu.model_fields
    return {r["name"]: catalog.Gpu(**{k: v for k, v in r.items() if k in fields})
            for r in recs if r["record"] == "gpu"}


def gpu_for(name: str, extra: dict[str, catalog.Gpu]) -> catalog.Gpu:
    """The catalogued GPU, else the file's own entry (a catalogued one wins once main catalogues it)."""
    return catalog.gpus().get(name.lower()) or extra[name]


def instance_for(gpu: str, gpus_per_node: int) -> catalog.Instance:
    """The run's machine: the closest EC2 type with the run's GPUs per node; a workstation for the 4090."""
    if gpu in BY_GPUS_PER_NODE:
        base = catalog.get_instance(BY_GPUS_PER_NODE[gpu][gpus_per_node])
    else:
        base = catalog.get_instance(BASE_INSTANCE[gpu])
    update: dict = {"gpu_count": gpus_per_node}
    if gpu in WORKSTATION:
        update |= {"type": f"workstation-{gpus_per_node}x{gpu.replace(' ', '')}", "gpu": gpu, "interconnect": "PCIe",
                   "network": "10 Gb", "efa": False}
    return base.model_copy(update=update)


_layouts: dict[str, ModelLayout] = {}


def layout_for(model: str | dict) -> ModelLayout:
    """A catalogued model by name, or an inline HF-style config (models the catalog does not hold)."""
    key = model if isinstance(model, str) else model["name"]
    if key not in _layouts:
        if isinstance(model, str):
            entry = catalog.find_model(model)
            if entry is None:
                raise ValueError(f"model {model!r} is not in catalogs/models.json")
            spec = from_catalog(entry)
        else:
            spec = spec_from_config(model["config"], name=model["name"], source=model["source"])
        _layouts[key] = inventory.layout_for(spec)[0]  # as ftplan does for a user: transformers where not analytic
    return _layouts[key]


def display_name(model: str | dict) -> str:
    if isinstance(model, dict):
        return model["display_name"]
    entry = catalog.find_model(model)
    return entry.display_name if entry else model


def measured_step_seconds(rec: dict, tokens_per_step: float, gpus: int = 1) -> float:
    """The published figure as seconds per optimizer step on each GPU (before any correction); `tokens_per_step`
    counts every GPU's tokens."""
    m = rec["measured"]
    if m["kind"] == "step_seconds":
        return m["value"]
    if m["kind"] == "tokens_per_second":  # over all GPUs
        return tokens_per_step / m["value"]
    if m["kind"] == "tokens_per_second_per_gpu":
        return tokens_per_step / (m["value"] * gpus)
    if m["kind"] == "wall_clock_seconds":
        steps = m["steps"] or m["tokens_total"] / tokens_per_step
        return m["value"] / steps
    raise ValueError(f"{rec['id']}: unknown measured kind {m['kind']!r}")


def loop_of(rec: dict) -> str:
    """The run's training loop as ftplan names it: the record's `loop`, else a plain PyTorch loop's ('custom':
    the model's outputs live through backward) or the Trainer's. It moves memory only, not the step's time."""
    return rec.get("loop") or ("custom" if rec.get("framework_kind") == "plain-pytorch" else "trainer")


def case_for(rec: dict, extra: dict[str, catalog.Gpu]) -> Case:
    layout = layout_for(rec["model"])
    micro = rec.get("micro_batch_per_gpu") or rec["micro_batch"]
    tokens_per_micro = rec.get("tokens_per_micro_batch") or micro * rec["seq_len"]
    lora = None if rec["method"] == "full" else LoraSettings(r=rec["lora_r"], targets=rec["lora_targets"])
    # attn_implementation where the source states one ftplan names (eager); else what transformers would use
    choices = SetupChoices(batch_size=micro, seq_len=rec["seq_len"], precision=rec["precision"],
                           optimizer=rec.get("optimizer"), grad_ckpt=rec["grad_ckpt"],
                           attention=rec.get("attn_implementation"), tf32=bool(rec.get("tf32")), loop=loop_of(rec),
                           **({"lora": lora} if lora else {}))
    setup = resolve(rec["method"], choices, model_type=layout.model_type)
    gpu = gpu_for(rec["gpu"], extra)
    instance = instance_for(rec["gpu"], rec["gpus_per_node"])
    parallel = Parallel(instance=instance, count=rec["nodes"], sharding=rec["sharding"])
    accum = rec["grad_accum"] or 1
    published = measured_step_seconds(rec, tokens_per_micro * accum * parallel.gpus, parallel.gpus)
    corrected = (rec.get("correction") or {}).get("step_seconds") or published
    return Case(rec=rec, layout=layout, setup=setup, counts=count_params(layout, setup.method, setup.lora),
                gpu=gpu, parallel=parallel, accum=accum, tokens_per_sequence=tokens_per_micro / micro,
                measured_seconds=corrected, published_seconds=published)


def load(path: Path = RUNS_JSONL) -> list[Case]:
    """Every used run of the file, and every rejected one that can still be predicted (for information), with
    memory and FLOPs computed once."""
    recs = records(path)
    kernels = {k.kernel for k in catalog.throughput().fused_attention.kernels}
    # every run, rejected ones too: a misspelt kernel would silently mean the matmul rate
    if unknown := [r["id"] for r in recs if "attention_kernel" in r and r["attention_kernel"] not in kernels]:
        raise ValueError(f"attention_kernel not in catalogs/throughput.json: {', '.join(unknown)}")
    extra = inline_gpus(recs)
    cases = [c for c in (case_for(r, extra) if r["use"] else rejected_case(r, extra)
                         for r in recs if r["record"] == "run") if c is not None]
    for c in cases:
        c.memory, c.flops = _memory(c), _flops(c)
    return cases


def rejected_case(rec: dict, extra: dict[str, catalog.Gpu]) -> Case | None:
    """A rejected run as a case, for its ratio's information, or None where it cannot be predicted: an unknown
    GPU, no measurement, settings ftplan does not take."""
    if not (rec.get("measured") or {}).get("value"):
        return None
    try:
        return case_for(rec, extra)
    except (KeyError, TypeError, ValueError, PlannerError):  # pydantic's ValidationError is a ValueError
        return None


def _flops(c: Case) -> FlopsPerToken:
    flops = flops_per_token(c.layout, c.setup, c.counts, c.tokens_per_sequence)
    if c.rec.get("modules_to_save_params"):
        # a trained lm_head copy (modules_to_save) adds its weight gradient; the embedding's is a scatter-add
        flops = flops.model_copy(update={"backward": flops.backward + 2.0 * c.layout.head_numel()})
    return flops


def _memory(c: Case) -> MemoryBreakdown:
    memory = estimate_memory(c.layout, c.setup, c.counts)
    extra = c.rec.get("modules_to_save_params") or 0
    if extra:
        # modules_to_save trains fp32 copies of embed_tokens and lm_head: their gradients (4 B) reach the
        # all-reduce, and their weight and two AdamW moments (12 B) pass through the optimizer step
        memory = memory.model_copy(update={"gradients_bytes": memory.gradients_bytes + 4 * extra,
                                           "optimizer_bytes": memory.optimizer_bytes + 12 * extra})
    return memory


def predict(c: Case) -> StepTime:
    """ftplan's step, assembled as recommend's evaluate assembles a candidate's."""
    return step_time(c.layout, c.setup, c.counts, c.gpu, c.memory, tokens_per_sequence=c.tokens_per_sequence,
                     accum=c.accum, parallel=c.parallel, flops=c.flops, attention_kernel=c.rec.get("attention_kernel"))


def held_out_ids(recs: list[dict]) -> set[str]:
    """The held-out rule, fixed before any fitting: among the used runs of each GPU, ordered by id, every
    third one (index % 3 == 2) is held out; the rest train. The fresh blocks (collected after a model was
    fixed, splits FRESH_SPLITS) are outside the rule. A run rejected after the split was dealt
    (`rejected_after_split`), or whose GPU was corrected after it (`dealt_gpu`: the GPU it was dealt with),
    keeps its place in the deal, so no other run changes side."""
    out: set[str] = set()
    fitted = [r for r in recs if r["record"] == "run" and (r["use"] or r.get("rejected_after_split"))
              and r["split"] not in FRESH_SPLITS]
    dealt = {r["id"]: r.get("dealt_gpu", r["gpu"]) for r in fitted}
    for gpu in set(dealt.values()):
        used = sorted(rid for rid, g in dealt.items() if g == gpu)
        out |= {rid for i, rid in enumerate(used) if i % 3 == 2}
    return out
