"""FSDP's per-process memory, measured on the CPU, against ftplan's sharded estimate.

Runs torch's FSDP2 (`fully_shard`) itself - two or four processes over gloo - on models built by the code ftplan's
backend trains with, wrapped as accelerate wraps them for `fsdp_version: 2` with TRANSFORMER_BASED_WRAP (each
decoder layer a unit, then the root; trainable parameters in fp32; the mixed-precision policy accelerate sets
from bf16: param_dtype = reduce_dtype = bf16; autocast around the forward), and steps as the Trainer steps:
loss / accumulation per micro-batch, the micro-batches before the last under accelerate's no_sync
(`set_requires_gradient_sync(False)`) unless the case syncs every micro-batch (accelerate's sync_each_batch),
clip to 1.0, fused AdamW, zero_grad(set_to_none=True). Each process is measured with the instruments of
benchmarks/deepspeed_cpu.py (census of tensor storages before the step + the peak RSS rise over it).

    python benchmarks/fsdp_cpu.py           # all cases not yet in results/fsdp_cpu.jsonl; writes benchmarks/FSDP.md
    python benchmarks/fsdp_cpu.py --report  # rewrite the report from the stored results

Held-out rule, fixed before any case ran: the two cases without accumulation on the first model are train
(ftplan's FSDP model may be changed after seeing them); every other case is held out. The no_sync term of the
model (sharding._unsynced_gradients) was written from accelerate's and torch's source before any case ran.
Cases added later are held out too; the report says which were measured after the model's last change.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from deepspeed_cpu import MODELS, _census, _status, bench_main, error_summary, run_ranks  # noqa: E402 - sibling

RESULTS = HERE / "results" / "fsdp_cpu.jsonl"
# held-out cases first measured after the model's last change (the rest had been seen before it)
AFTER_LAST_CHANGE = {"llama-2k-10l/fsdp/1x64-4proc", "llama-2k-10l/fsdp/1x32", "qwen-896-4l-tied/fsdp/1x32",
                     "llama-2k-10l/fsdp/lora/1x64", "llama-2k-10l/fsdp/1x64-accum2-sync-4proc",
                     "llama-2k-10l/fsdp/1x64-fp32-4proc"}
AFTER_LABEL = "held-out, measured after the last change"
REPORT = HERE / "FSDP.md"


def _setup(batch: int, seq: int, ckpt: bool = False, accum: int = 1, sync: bool = False, world: int = 2,
           precision: str = "bf16-mixed", method: str = "full", nodes: int = 1) -> dict:
    """The case's TrainingSetup as JSON, with `grad_accum` (micro-batches per optimizer step), `world`
    (processes) and `nodes` beside it (more than one: HSDP, sharded within a "node", replicated across).
    LoRA: r 16 on every linear layer, a bf16 base, fp32 adapters; QLoRA the same over an NF4 double-quantized
    base stored in bf16 (bnb_4bit_quant_storage, the QLoRA + FSDP recipe)."""
    lora = {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["all-linear"]}} if method != "full" else {}
    if method == "qlora":
        lora |= {"quant_type": "nf4", "double_quant": True}
    return {"method": method, "batch_size": batch, "seq_len": seq, "precision": precision,
            "optimizer": "adamw_torch_fused", "grad_ckpt": ckpt, "attention": "sdpa", "loop": "trainer",
            "sync_each_batch": sync, **lora, "grad_accum": accum, "world": world,
            **({"nodes": nodes} if nodes > 1 else {})}


CASES = [  # (id, model, setup, split)
    ("llama-1k-2l/fsdp/1x128", "llama-1k-2l", _setup(1, 128), "train"),
    ("llama-1k-2l/fsdp/2x512", "llama-1k-2l", _setup(2, 512), "train"),
    ("llama-1k-2l/fsdp/2x512-ckpt", "llama-1k-2l", _setup(2, 512, True), "held-out"),
    ("qwen-896-4l-tied/fsdp/2x256", "qwen-896-4l-tied", _setup(2, 256), "held-out"),
    ("llama-1k-2l/fsdp/1x128-accum2", "llama-1k-2l", _setup(1, 128, accum=2), "held-out"),
    ("llama-1k-2l/fsdp/2x512-accum2", "llama-1k-2l", _setup(2, 512, accum=2), "held-out"),
    ("llama-1k-2l/fsdp/2x512-accum2-sync", "llama-1k-2l", _setup(2, 512, accum=2, sync=True), "held-out"),
    ("qwen-896-4l-tied/fsdp/2x256-accum2", "qwen-896-4l-tied", _setup(2, 256, accum=2), "held-out"),
    # on two processes bf16 gradients held whole take what fp32 ones sharded in two do, so the cases above
    # cannot tell no_sync from syncing; these can (added after the above had run; held out)
    ("llama-1k-2l/fsdp/2x512-accum2-4proc", "llama-1k-2l", _setup(2, 512, accum=2, world=4), "held-out"),
    ("llama-1k-2l/fsdp/2x512-accum2-4proc-sync", "llama-1k-2l", _setup(2, 512, accum=2, sync=True, world=4),
     "held-out"),
    ("llama-1k-2l/fsdp/2x512-accum2-fp32", "llama-1k-2l", _setup(2, 512, accum=2, precision="fp32"), "held-out"),
    ("llama-1k-2l/fsdp/2x512-accum2-fp32-sync", "llama-1k-2l",
     _setup(2, 512, accum=2, sync=True, precision="fp32"), "held-out"),
    # LoRA under FSDP (frozen bf16 base and fp32 adapters in the same units), added after all of the above had
    # run and with the model unchanged since; held out
    ("llama-1k-2l/fsdp/lora/2x512", "llama-1k-2l", _setup(2, 512, method="lora"), "held-out"),
    ("llama-1k-2l/fsdp/lora/2x512-accum2", "llama-1k-2l", _setup(2, 512, accum=2, method="lora"), "held-out"),
    ("qwen-896-4l-tied/fsdp/lora/2x256", "qwen-896-4l-tied", _setup(2, 256, method="lora"), "held-out"),
    # measured after the model learned that the policy's bf16 weights make a bf16 residual stream and bf16
    # adapters (FSDP.md); held out
    ("qwen-896-4l-tied/fsdp/2x256-ckpt", "qwen-896-4l-tied", _setup(2, 256, True), "held-out"),
    ("llama-1k-2l/fsdp/lora/2x512-ckpt", "llama-1k-2l", _setup(2, 512, True, method="lora"), "held-out"),
    ("qwen-896-4l-tied/fsdp/lora/2x256-accum2-4proc", "qwen-896-4l-tied",
     _setup(2, 256, accum=2, world=4, method="lora"), "held-out"),
    ("llama-1k-2l/fsdp/1x256", "llama-1k-2l", _setup(1, 256), "held-out"),
    ("llama-2k-10l/fsdp/1x64", "llama-2k-10l", _setup(1, 64), "held-out"),
    # QLoRA under FSDP, added after all of the above had run and with the model unchanged since; held out
    ("llama-1k-2l/fsdp/qlora/2x512-ckpt", "llama-1k-2l", _setup(2, 512, True, method="qlora"), "held-out"),
    ("llama-1k-2l/fsdp/qlora/2x512", "llama-1k-2l", _setup(2, 512, method="qlora"), "held-out"),
    ("qwen-896-4l-tied/fsdp/qlora/2x256-ckpt", "qwen-896-4l-tied", _setup(2, 256, True, method="qlora"),
     "held-out"),
    # HSDP (--sharding fsdp-hybrid): 4 processes as 2 "nodes" of 2, added after all of the above had run and
    # with the model unchanged since; held out
    ("llama-1k-2l/hsdp/2x512-4proc", "llama-1k-2l", _setup(2, 512, world=4, nodes=2), "held-out"),
    ("llama-1k-2l/hsdp/2x512-accum2-4proc", "llama-1k-2l", _setup(2, 512, accum=2, world=4, nodes=2), "held-out"),
    # measured after the model learned the root unit's reduce-scatter buffers at the end of backward (each term
    # of sharding._root_reduce: no cast in fp32 and pure bf16, sync_each_batch's added shard, 4-way shards,
    # HSDP's all-reduce, a tied head); held out
    ("llama-1k-2l/fsdp/1x128-fp32", "llama-1k-2l", _setup(1, 128, precision="fp32"), "held-out"),
    ("llama-1k-2l/fsdp/1x128-bf16", "llama-1k-2l", _setup(1, 128, precision="bf16"), "held-out"),
    ("llama-1k-2l/fsdp/1x128-accum2-sync", "llama-1k-2l", _setup(1, 128, accum=2, sync=True), "held-out"),
    ("llama-1k-2l/fsdp/1x128-accum2-fp32-sync", "llama-1k-2l", _setup(1, 128, accum=2, sync=True, precision="fp32"),
     "held-out"),
    ("llama-1k-2l/fsdp/1x128-4proc", "llama-1k-2l", _setup(1, 128, world=4), "held-out"),
    ("llama-1k-2l/hsdp/1x128-4proc", "llama-1k-2l", _setup(1, 128, world=4, nodes=2), "held-out"),
    ("llama-1k-2l/fsdp/1x128-accum2-4proc-sync", "llama-1k-2l", _setup(1, 128, accum=2, sync=True, world=4),
     "held-out"),
    ("qwen-896-4l-tied/fsdp/1x64", "qwen-896-4l-tied", _setup(1, 64), "held-out"),
    ("llama-2k-10l/fsdp/1x64-accum2-sync", "llama-2k-10l", _setup(1, 64, accum=2, sync=True), "held-out"),
    # measured after the model learned that gloo's reduce-scatter copies its whole input (the CPU's term of
    # sharding._root_reduce, found from four of the cases above); held out
    ("llama-1k-2l/fsdp/1x128-bf16-4proc", "llama-1k-2l", _setup(1, 128, precision="bf16", world=4), "held-out"),
    ("llama-1k-2l/fsdp/1x128-fp32-4proc", "llama-1k-2l", _setup(1, 128, precision="fp32", world=4), "held-out"),
    ("qwen-896-4l-tied/fsdp/1x64-fp32", "qwen-896-4l-tied", _setup(1, 64, precision="fp32"), "held-out"),
    ("llama-2k-10l/fsdp/1x64-fp32", "llama-2k-10l", _setup(1, 64, precision="fp32"), "held-out"),
    ("llama-1k-2l/hsdp/1x128-fp32-4proc", "llama-1k-2l", _setup(1, 128, precision="fp32", world=4, nodes=2),
     "held-out"),
    ("llama-1k-2l/fsdp/1x128-accum2-bf16-sync", "llama-1k-2l", _setup(1, 128, accum=2, sync=True, precision="bf16"),
     "held-out"),
    ("llama-1k-2l/fsdp/1x256-accum2-fp32", "llama-1k-2l", _setup(1, 256, accum=2, precision="fp32"), "held-out"),
    # measured after the model learned the forward's start (the root's all-gather output kept beside its copy),
    # the root unit's gradients whole until it reduces, and a tied head's out-of-place sum without autocast,
    # each found from the two misses just above; held out
    ("llama-1k-2l/fsdp/1x128-accum2-fp32", "llama-1k-2l", _setup(1, 128, accum=2, precision="fp32"), "held-out"),
    ("qwen-896-4l-tied/fsdp/1x64-accum2", "qwen-896-4l-tied", _setup(1, 64, accum=2), "held-out"),
    ("llama-1k-2l/fsdp/1x64-accum2-4proc", "llama-1k-2l", _setup(1, 64, accum=2, world=4), "held-out"),
    ("qwen-896-4l-tied/fsdp/1x64-fp32-4proc", "qwen-896-4l-tied", _setup(1, 64, precision="fp32", world=4),
     "held-out"),
    ("qwen-896-4l-tied/fsdp/1x64-bf16", "qwen-896-4l-tied", _setup(1, 64, precision="bf16"), "held-out"),
    ("llama-1k-2l/fsdp/2x256-fp32-4proc", "llama-1k-2l", _setup(2, 256, precision="fp32", world=4), "held-out"),
    ("llama-2k-10l/fsdp/1x64-accum2", "llama-2k-10l", _setup(1, 64, accum=2), "held-out"),
    # measured after the model learned the backward's start (the root unit gathered again beside every
    # activation), the forward's later layers, and that a new gradient of a weight gathered in bf16 stays bf16
    # (the head's, a tied head's pending one), each found from two misses of the block above; held out
    ("llama-1k-2l/fsdp/1x64-accum2", "llama-1k-2l", _setup(1, 64, accum=2), "held-out"),
    ("llama-2k-10l/fsdp/1x128-accum2-4proc", "llama-2k-10l", _setup(1, 128, accum=2, world=4), "held-out"),
    ("llama-1k-2l/fsdp/1x128-accum2-fp32-4proc", "llama-1k-2l", _setup(1, 128, accum=2, precision="fp32", world=4),
     "held-out"),
    ("llama-1k-2l/hsdp/1x64-accum2-4proc", "llama-1k-2l", _setup(1, 64, accum=2, world=4, nodes=2), "held-out"),
    ("qwen-896-4l-tied/fsdp/1x128-accum2-4proc", "qwen-896-4l-tied", _setup(1, 128, accum=2, world=4), "held-out"),
    ("qwen-896-4l-tied/fsdp/1x32-4proc", "qwen-896-4l-tied", _setup(1, 32, world=4), "held-out"),
    ("llama-1k-2l/fsdp/2x128-accum2-bf16", "llama-1k-2l", _setup(2, 128, accum=2, precision="bf16"), "held-out"),
    # measured after the model learned that HSDP holds every unit's all-reduced bf16 shard to the end of backward
    # (found from hsdp/1x128-4proc above); held out
    ("llama-1k-2l/hsdp/1x256-4proc", "llama-1k-2l", _setup(1, 256, world=4, nodes=2), "held-out"),
    ("qwen-896-4l-tied/hsdp/1x64-4proc", "qwen-896-4l-tied", _setup(1, 64, world=4, nodes=2), "held-out"),
    ("llama-1k-2l/hsdp/1x128-accum2-sync-4proc", "llama-1k-2l", _setup(1, 128, accum=2, sync=True, world=4, nodes=2),
     "held-out"),
    ("llama-1k-2l/hsdp/1x128-bf16-4proc", "llama-1k-2l", _setup(1, 128, precision="bf16", world=4, nodes=2),
     "held-out"),
    # measured after the model learned the layers' backward (the root unit gathered throughout it, the layer
    # above's reduce-scatter input kept, the layer below prefetched) and sync_each_batch's whole root
    # gradients, found from the 10-layer accum2-sync case (-2.05%); held out
    ("llama-2k-10l/fsdp/1x64-4proc", "llama-2k-10l", _setup(1, 64, world=4), "held-out"),
    ("llama-2k-10l/fsdp/1x32", "llama-2k-10l", _setup(1, 32), "held-out"),
    ("qwen-896-4l-tied/fsdp/1x32", "qwen-896-4l-tied", _setup(1, 32), "held-out"),
    ("llama-2k-10l/fsdp/lora/1x64", "llama-2k-10l", _setup(1, 64, method="lora"), "held-out"),
    ("llama-2k-10l/fsdp/1x64-accum2-sync-4proc", "llama-2k-10l", _setup(1, 64, accum=2, sync=True, world=4),
     "held-out"),
    ("llama-2k-10l/fsdp/1x64-fp32-4proc", "llama-2k-10l", _setup(1, 64, precision="fp32", world=4), "held-out"),
]


def _parse(setup_json: dict):
    """(the TrainingSetup, its accumulation) from a case's setup JSON."""
    from ftplan.estimate.settings import TrainingSetup

    extra = ("grad_accum", "world", "nodes")
    return TrainingSetup.model_validate({k: v for k, v in setup_json.items() if k not in extra}), \
        setup_json["grad_accum"]


def _wrap(model, torch, mixed: bool, nodes: int = 1):
    """FSDP2 as accelerate's fsdp2_prepare_model applies it: under bf16 mixed precision its policy, else none;
    over several nodes a (replicate, shard) mesh (HSDP, accelerate's fsdp-hybrid)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                  output_dtype=torch.bfloat16) if mixed else MixedPrecisionPolicy()
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (nodes, world // nodes), mesh_dim_names=("replicate", "shard")) \
        if nodes > 1 else None
    units = tuple(m for m in model.modules() if type(m).__name__ in set(model._no_split_modules))
    for unit in units:
        fully_shard(unit, reshard_after_forward=True, mp_policy=policy, mesh=mesh)
    fully_shard(model, reshard_after_forward=True, mp_policy=policy, mesh=mesh)
    return model


def worker(config: dict, setup_json: dict) -> dict:
    """One rank (torch's env:// rendezvous): build, shard, two optimizer steps, then the census and the RSS
    rise over a third."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from ftplan.model.spec import spec_from_config
    from ftplan.train.build import autocast, build_model, random_batch

    import cpu_bf16  # as benchmarks/accuracy.py: blocked fp32 kernels where the CPU has no bf16 instructions

    kernels = cpu_bf16.needed()
    if kernels:
        cpu_bf16.install()
    spec = spec_from_config(config, name="case", source="benchmark")
    setup, accum = _parse(setup_json)
    torch.manual_seed(0)
    # built before the process group exists: QLoRA's save-and-reload through bitsandbytes would otherwise save
    # on rank 0 alone (transformers' save_pretrained under torch.distributed)
    model = build_model(spec, setup, device="cpu", sharded=True)
    dist.init_process_group("gloo", timeout=timedelta(hours=2))
    model = _wrap(model, torch, setup.precision.endswith("-mixed"), setup_json.get("nodes", 1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    batch = random_batch(spec.dims.vocab, setup, "cpu")

    def step():
        for k in range(accum):
            model.set_requires_gradient_sync(setup.sync_each_batch or k == accum - 1)
            with autocast(setup, "cpu"):
                loss = model(**batch).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    census = _census(torch)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    rise = _status("VmHWM") - before
    rank = dist.get_rank()
    dist.destroy_process_group()
    return {"rank": rank, "census_bytes": census,
            "rss_rise_bytes": rise, "measured_bytes": census + rise, "step_seconds": seconds,
            "torch": torch.__version__, "cpu_bf16_kernels": kernels}


def estimate(model: str, setup_json: dict, **update) -> dict:
    """`ftplan estimate --device cpu --gpus 2 --sharding fsdp` for the case (`update` changes its setup)."""
    from ftplan.estimate.memory import estimate_memory
    from ftplan.estimate.sharding import shard
    from ftplan.model.architectures import build_layout
    from ftplan.model.spec import spec_from_config

    layout = build_layout(spec_from_config(MODELS[model], name=model, source="benchmark"))
    setup, accum = _parse(setup_json)
    setup = setup.model_copy(update=update)
    memory = estimate_memory(layout, setup, device="cpu", accumulating=accum > 1)
    nodes = setup_json.get("nodes", 1)
    s = shard(layout, setup, memory, gpus=setup_json["world"], nodes=nodes,
              sharding="fsdp-hybrid" if nodes > 1 else "fsdp", device="cpu")
    return {"estimated_bytes": s.peak_allocated_bytes, "peak_phase": s.peak_phase, "params": layout.total_params()}


def _no_sync_pairs(records: list[dict]) -> list[str]:
    """Lines for each case run as the Trainer runs it (no_sync) beside its -sync twin: what holding the gradients
    whole costs over sharding them every micro-batch, measured and estimated."""
    by_id = {r["id"]: r for r in records}
    lines = []
    for cid, r in by_id.items():
        twin = by_id.get(cid + "-sync")
        if twin:
            measured = (r["measured_bytes"] - twin["measured_bytes"]) / 1e6
            estimated = (estimate(r["model"], r["setup"])["estimated_bytes"]
                         - estimate(twin["model"], twin["setup"])["estimated_bytes"]) / 1e6
            lines.append(f"- {cid}: no_sync minus its -sync twin, measured {measured:+.1f} MB, estimated "
                         f"{estimated:+.1f} MB")
    return lines


def report(records: list[dict]) -> str:
    """FSDP.md: each case with today's estimate, and the error summary per split."""
    rows, errors = [], {"train": [], "held-out": [], AFTER_LABEL: []}
    for r in records:
        e = estimate(r["model"], r["setup"])
        err = (e["estimated_bytes"] - r["measured_bytes"]) / r["measured_bytes"] * 100
        errors[r["split"]].append(abs(err))
        if r["id"] in AFTER_LAST_CHANGE:
            errors[AFTER_LABEL].append(abs(err))
        synced = "-"
        if r["setup"]["grad_accum"] > 1 and not r["setup"]["sync_each_batch"]:
            s = estimate(r["model"], r["setup"], sync_each_batch=True)["estimated_bytes"]
            synced = f"{(s - r['measured_bytes']) / r['measured_bytes'] * 100:+.2f}%"
        census = " / ".join(f"{x['census_bytes'] / 2**20:.1f}" for x in r["ranks"])
        rise = " / ".join(f"{x['rss_rise_bytes'] / 2**20:.1f}" for x in r["ranks"])
        first = (r["estimate_at_measure_bytes"] - r["measured_bytes"]) / r["measured_bytes"] * 100
        rows.append(f"| {r['id']} | {r['split']} | {e['params'] / 1e6:.0f}M | {e['estimated_bytes'] / 2**20:.1f} | "
                    f"{r['measured_bytes'] / 2**20:.1f} | {err:+.2f}% | {first:+.2f}% | {synced} | {census} | "
                    f"{rise} | {e['peak_phase']} |")
    versions = records[0]["ranks"][0] if records else {}
    return "\n".join([
        "# FSDP memory against FSDP itself (CPU)", "",
        (f"Generated by `python benchmarks/fsdp_cpu.py`: torch {versions.get('torch')} FSDP2, two or four processes "
         f"over gloo; cases measured {records[0]['date'] if records else ''} onward. Method, instruments and held-out "
         "rule: the script's docstring. Estimate = `ftplan estimate --device cpu --gpus 2 --sharding fsdp "
         "[--grad-accum 2] [--sync-each-batch]` (today's model); measured = census + RSS rise of the larger "
         "process. Full fine-tuning (LoRA and QLoRA r16 all-linear where named), bf16-mixed (accelerate's FSDP2 "
         "policy) "
         "unless named fp32, fused AdamW."), "",
        *error_summary(errors), "",
        "What the Trainer's no_sync costs under FSDP with gradient accumulation (gradients held whole, in bf16 "
        "under the policy, against sharded every micro-batch; on two processes with bf16 the two weigh the same; "
        "at small micro-batches syncing costs more, each micro-batch making the root unit's reduce-scatter "
        "buffers):",
        "", *_no_sync_pairs(records), "",
        ("| case | split | params | estimated MiB | measured MiB | error | error when measured | error if gradients "
         "were sharded every micro-batch | census MiB (ranks) | RSS rise MiB (ranks) | estimated peak phase |"),
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        ("'error when measured': the model as it stood when the case ran. Each change below was made after the "
         "cases before it had been seen, and each block of cases in the table after it was measured with it in "
         "place (held out; the summary's last line is the last block):"), "",
        ("1. Under bf16-mixed the root unit gathers the head in bf16, so autocast's copy of the head weight is "
         "not counted on top (65.5 MB here)."),
        ("2. More generally, FSDP's mixed-precision policy gathers every weight in bf16, so the embeddings hand "
         "the layers a bf16 residual stream (norms save bf16; full fine-tuning's layers need no fp32-input "
         "copies), autocast copies no weight, and PEFT casts the adapters' input to the gathered bf16 adapters "
         "before dropout (the CPU keeps the dropout's noise in that dtype); the single-GPU step is re-estimated "
         "so (estimate_memory gathered_half), which replaced 1. Next block: LoRA, QLoRA (4-bit weights stored in "
         "bf16 so FSDP can shard them) and HSDP, the first time each ran here."),
        ("3. The root unit (embeddings, final norm, head) reduce-scatters full fine-tuning's gradients last "
         "(sharding._root_reduce, from torch's foreach_reduce and a probe of the resident set at each of its "
         "calls): its reduce-scatter input is kept until the end of backward, a loop variable keeps the unit's "
         "last gradient (the untied head's) past the copy-in, and the output shard and its fp32 cast exist "
         "beside them. The three misses before it (1x128 -10.43%, 1x256 -10.22%, the 10-layer 1x64 -2.77%) "
         "peak there; a probe had found the root's reduce-scatter input held, and an uncommitted copy-in term "
         "alone had brought 1x128 to +2.8% but moved two accumulating cases to +5.7% and +10.5%. Next block: "
         "four misses at -9.94% to -18.92% (fp32, pure bf16, 4 processes)."),
        ("4. Gloo's reduce-scatter copies its whole input while it runs (benchmarks/gloo_copies.py: a bare "
         "dist.reduce_scatter_tensor of a 64 MiB input, its output touched before, raises the resident set "
         "66.3 MiB on two processes and 66.4 MiB on four); "
         "under the policy on two processes that copy weighs what the fp32 cast does, which hid it. Counted "
         "for the CPU only (NCCL has no input-sized copy). Next block: two misses, a tied head in fp32 "
         "(-23.15%) and no_sync fp32 at 1x256 (-6.59%)."),
        ("5. Until the root unit reduces, its gradients are whole in the gathered dtype, not this GPU's shard "
         "(sharding._root_held_whole; under the policy on two processes the two weigh the same); a tied head's "
         "gradient and the embedding's are summed into a new tensor unless autocast's cast hands the sum its "
         "own buffer (memory.embedding_backward: 2 x 4 bytes per element in fp32, measured); and the forward's "
         "start: FSDP2 frees a unit's all-gather output only when the next unit's weights are copied out "
         "(in the forward only; torch's wait_for_unshard), so the root's weights and output sit beside the "
         "first layer's. Next block: two misses under no_sync with bf16-mixed, +10.13% (tied) and +5.14%."),
        ("6. A new gradient of a weight gathered in bf16 stays bf16 (the head's under no_sync, a tied head's "
         "pending one: both had been counted in fp32 with autocast's cast); the root unit, resharded after "
         "the forward, is gathered again at the start of backward beside every activation (on the CPU beside "
         "gloo's copy of the all-gather output and the input cast to bf16); a later layer's all-gather in the "
         "forward holds the root and three layers' worth."),
        ("7. Across nodes (HSDP) each unit all-reduces its bf16 shard and FSDP2 holds that buffer until the end of "
         "backward (FSDPParamGroup._all_reduce_state; a probe of hsdp/1x128-4proc saw each layer's 12.2 MiB "
         "freed only at finalize_backward), beside the fp32 shard cast from it; with no cast the buffer is the "
         "shard itself. hsdp/1x128-4proc read -2.54% before it."),
        ("8. Through the layers' backward the root unit stays gathered (resharded only when it reduces, at the "
         "end), beside the layer being computed, the one below being prefetched (on the CPU with gloo's copy of "
         "its all-gather output: a bare all_gather_into_tensor of a 64 MiB output, touched before, rises "
         "64.2 MiB on two and four processes, benchmarks/gloo_copies.py) and, for full fine-tuning, the "
         "reduce-scatter input of the layer above, kept until the next "
         "reduce; with sync_each_batch this micro-batch's root gradients are whole beside the earlier shards. "
         "Found from the 10-layer accum2-sync case (-2.05%: a probe put its peak in the second layer's "
         "backward); it moves Llama-2-70B full on 16 GPUs from 122.5 to 125.2 GiB per GPU."), "",
        ("What this does not show: CUDA (NCCL, the caching allocator, streams that prefetch the next unit's "
         "all-gather while this one computes), more than four processes, HSDP beyond a 2 x 2 mesh, offload, "
         "and torch versions other than the one above."), ""])


def run_case(case, index: int) -> dict:
    """Every rank of one case (the `index`-th: its rendezvous port), with the estimate as it stands now."""
    cid, model, setup_json, split = case
    before = estimate(model, setup_json)["estimated_bytes"]
    ranks = run_ranks(__file__, {"config": MODELS[model], "setup": setup_json}, 29700 + index, cid,
                      setup_json["world"])
    return {"id": cid, "model": model, "setup": setup_json, "split": split, "ranks": ranks,
            "measured_bytes": max(r["measured_bytes"] for r in ranks), "estimate_at_measure_bytes": before,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> int:
    return bench_main(__doc__, lambda r: worker(r["config"], r["setup"]), CASES, RESULTS, REPORT, run_case, report)


if __name__ == "__main__":
    sys.exit(main())
