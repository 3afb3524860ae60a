"""DeepSpeed ZeRO's per-process memory, measured on the CPU, against ftplan's sharded estimate.

ftplan models what DeepSpeed ZeRO 1-3 holds from DeepSpeed's source (planner/estimate/deepspeed.py). This runs
DeepSpeed itself - two processes over gloo, DeepSpeed's CPU accelerator - on models built by the code ftplan's
backend trains with, configured as ftplan's hf backend configures it (accelerate's DeepSpeedPlugin, the
Trainer's "auto" buckets), and measures each process with instruments that do not depend on ftplan:

- census: the bytes of every tensor storage alive before the measured step (gc's objects), i.e. what DeepSpeed
  keeps between steps (bf16 shards, fp32 masters, optimizer states, gradient partitions, buckets);
- RSS: the process's peak resident set over one step above the resident set before it (glibc set to serve every
  allocation of 64 KiB or more by mmap and to return freed memory at once; VmHWM reset through clear_refs).

measured = census + RSS rise, per process (bf16 matmuls through benchmarks/cpu_bf16.py's kernels where the CPU
has no bf16 instructions, as for ACCURACY.md); the larger of the two processes is compared with
`shard(..., device="cpu")` for the same setup. Needs DeepSpeed (the `deepspeed` extra, which `make test` installs):

    make install-dev                            # installs the deepspeed extra (0.19.8 was measured)
    python benchmarks/deepspeed_cpu.py          # all cases; writes benchmarks/DEEPSPEED.md
    python benchmarks/deepspeed_cpu.py --report # rewrite the report from benchmarks/results/deepspeed_cpu.jsonl

Held-out rule, fixed before any held-out case ran: the three cases on the first model (one per stage) were
looked at while the model of the buffers was written; every other case is held out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "deepspeed_cpu.jsonl"
REPORT = HERE / "DEEPSPEED.md"
GLIBC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}

LLAMA_1K = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
            "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 2,
            "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "hidden_act": "silu", "rope_theta": 10000.0}
QWEN_TIED = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
             "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 4,
             "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": True, "hidden_act": "silu", "rope_theta": 1000000.0}
# 634M parameters: the embedding and the first layer are reused beyond 1e9 parameters, so ZeRO-3 releases them
LLAMA_2K_DEEP = {**LLAMA_1K, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 10}
MODELS = {"llama-1k-2l": LLAMA_1K, "qwen-896-4l-tied": QWEN_TIED, "llama-2k-10l": LLAMA_2K_DEEP}


def _setup(batch: int, seq: int, ckpt: bool = False, accum: int = 1, method: str = "full") -> dict:
    """The case's TrainingSetup as JSON, with `grad_accum` (micro-batches per optimizer step) beside it. LoRA: r 16
    on every linear layer (records before 2026-12-01 have no method key: full)."""
    lora = {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["all-linear"]}} \
        if method == "lora" else {}
    return {"method": "full", "batch_size": batch, "seq_len": seq, "precision": "bf16-mixed",
            "optimizer": "adamw_torch_fused", "grad_ckpt": ckpt, "attention": "sdpa", "loop": "trainer",
            **lora, "grad_accum": accum}


def _parse(setup_json: dict):
    """(the TrainingSetup, its accumulation) from a case's setup JSON (records before 2026-12-01 have none: 1)."""
    from ftplan.estimate.settings import TrainingSetup

    accum = setup_json.get("grad_accum", 1)
    return TrainingSetup.model_validate({k: v for k, v in setup_json.items() if k != "grad_accum"}), accum


CASES = [  # (id, model, ZeRO stage, setup, split)
    ("llama-1k-2l/zero1/1x128", "llama-1k-2l", 1, _setup(1, 128), "train"),
    ("llama-1k-2l/zero2/1x128", "llama-1k-2l", 2, _setup(1, 128), "train"),
    ("llama-1k-2l/zero3/1x128", "llama-1k-2l", 3, _setup(1, 128), "train"),
    ("qwen-896-4l-tied/zero2/2x256", "qwen-896-4l-tied", 2, _setup(2, 256), "held-out"),
    ("qwen-896-4l-tied/zero3/2x256", "qwen-896-4l-tied", 3, _setup(2, 256), "held-out"),
    ("llama-1k-2l/zero3/2x512-ckpt", "llama-1k-2l", 3, _setup(2, 512, True), "held-out"),
    ("llama-1k-2l/zero1/2x512-ckpt", "llama-1k-2l", 1, _setup(2, 512, True), "held-out"),
    ("llama-2k-10l/zero3/1x32", "llama-2k-10l", 3, _setup(1, 32), "held-out"),
    # added with gradient accumulation in the memory model, before any was measured: held out like the rest
    ("llama-1k-2l/zero1/1x128-accum2", "llama-1k-2l", 1, _setup(1, 128, accum=2), "held-out"),
    ("llama-1k-2l/zero2/1x128-accum2", "llama-1k-2l", 2, _setup(1, 128, accum=2), "held-out"),
    ("llama-1k-2l/zero3/1x128-accum2", "llama-1k-2l", 3, _setup(1, 128, accum=2), "held-out"),
    # at 128 tokens the step's peak is the optimizer's either way; at 2 x 512 it is in the forward and backward,
    # where the accumulated gradients are held (added after the three above had run; held out)
    ("llama-1k-2l/zero1/2x512-accum2", "llama-1k-2l", 1, _setup(2, 512, accum=2), "held-out"),
    ("llama-1k-2l/zero2/2x512-accum2", "llama-1k-2l", 2, _setup(2, 512, accum=2), "held-out"),
    # LoRA under ZeRO (DeepSpeed's bf16 casts the whole PEFT model, adapters included; accelerate turns autocast
    # off), added after the model learned it and before any ran; held out
    ("llama-1k-2l/zero2/lora/2x512", "llama-1k-2l", 2, _setup(2, 512, method="lora"), "held-out"),
    ("llama-1k-2l/zero3/lora/2x512", "llama-1k-2l", 3, _setup(2, 512, method="lora"), "held-out"),
    ("qwen-896-4l-tied/zero3/lora/2x256", "qwen-896-4l-tied", 3, _setup(2, 256, method="lora"), "held-out"),
    # added after the three above had run, with the model unchanged; held out
    ("llama-1k-2l/zero3/lora/1x256", "llama-1k-2l", 3, _setup(1, 256, method="lora"), "held-out"),
    ("llama-1k-2l/zero3/lora/2x512-ckpt", "llama-1k-2l", 3, _setup(2, 512, True, method="lora"), "held-out"),
    ("llama-1k-2l/zero1/lora/2x512-ckpt", "llama-1k-2l", 1, _setup(2, 512, True, method="lora"), "held-out"),
    # measured after the model learned that ZeRO-3 fetches module by module (not FSDP's units) and releases a
    # frozen embedding after its forward unless checkpointing makes PEFT require its output's gradient; held out
    ("llama-1k-2l/zero3/lora/1x128", "llama-1k-2l", 3, _setup(1, 128, method="lora"), "held-out"),
    ("llama-1k-2l/zero3/lora/1x256-ckpt", "llama-1k-2l", 3, _setup(1, 256, True, method="lora"), "held-out"),
    ("qwen-896-4l-tied/zero3/lora/1x64", "qwen-896-4l-tied", 3, _setup(1, 64, method="lora"), "held-out"),
    ("llama-2k-10l/zero3/lora/1x64", "llama-2k-10l", 3, _setup(1, 64, method="lora"), "held-out"),
    ("llama-2k-10l/zero3/lora/1x64-ckpt", "llama-2k-10l", 3, _setup(1, 64, True, method="lora"), "held-out"),
]


def worker(stage: int, config: dict, setup_json: dict) -> dict:
    """One rank (run under torch's env:// rendezvous): build, wrap in DeepSpeed as accelerate does, two steps,
    then the census and the RSS rise over a third."""
    import deepspeed
    import torch
    from accelerate.utils import DeepSpeedPlugin

    from ftplan.model.spec import spec_from_config
    from ftplan.train.build import build_model, random_batch

    sys.path.insert(0, str(HERE))
    import cpu_bf16  # as benchmarks/accuracy.py: blocked fp32 kernels where the CPU has no bf16 instructions

    kernels = cpu_bf16.needed()
    if kernels:
        cpu_bf16.install()
    from datetime import timedelta

    deepspeed.init_distributed("gloo", timeout=timedelta(hours=2))  # a 634M model's CPU step outlasts gloo's 10 min
    world = torch.distributed.get_world_size()
    spec = spec_from_config(config, name="case", source="benchmark")
    setup, accum = _parse(setup_json)
    torch.manual_seed(0)
    model = build_model(spec, setup, device="cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    plugin = DeepSpeedPlugin(zero_stage=stage, offload_optimizer_device="none", offload_param_device="none",
                             zero3_init_flag=False, gradient_accumulation_steps=accum)
    ds = dict(plugin.deepspeed_config)
    hidden = config["hidden_size"]
    # what accelerate's prepare() fills in for ftplan's generated config (plugins/hf/launch.deepspeed_config)
    ds.update(train_micro_batch_size_per_gpu=setup.batch_size, train_batch_size=setup.batch_size * world * accum,
              gradient_accumulation_steps=accum,
              gradient_clipping=1.0, bf16={"enabled": True})
    ds["zero_optimization"].update(reduce_bucket_size=hidden * hidden,
                                   stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                                   stage3_param_persistence_threshold=10 * hidden)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    batch = random_batch(spec.dims.vocab, setup, "cpu")

    def step():  # one optimizer step: the engine steps only at the accumulation boundary
        for _ in range(accum):
            engine.backward(engine(**batch).loss)
            engine.step()

    step()
    step()
    census = _census(torch)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    rise = _status("VmHWM") - before
    return {"rank": torch.distributed.get_rank(), "census_bytes": census, "rss_rise_bytes": rise,
            "measured_bytes": census + rise, "step_seconds": seconds, "deepspeed": deepspeed.__version__,
            "torch": torch.__version__, "cpu_bf16_kernels": kernels, "zero_optimization": ds["zero_optimization"]}


def _census(torch) -> int:
    """Bytes of every distinct tensor storage the garbage collector can see."""
    gc.collect()
    census, seen = 0, set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            try:
                storage = obj.untyped_storage()
                storage.data_ptr()
            except RuntimeError:  # a wrapper subclass (FSDP's DTensor): its local tensor is counted instead
                continue
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                census += storage.nbytes()
    return census


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def estimate(model: str, stage: int, setup_json: dict) -> dict:
    from ftplan.estimate.memory import estimate_memory
    from ftplan.estimate.sharding import shard
    from ftplan.model.architectures import build_layout
    from ftplan.model.spec import spec_from_config

    layout = build_layout(spec_from_config(MODELS[model], name=model, source="benchmark"))
    setup, accum = _parse(setup_json)
    memory = estimate_memory(layout, setup, device="cpu", accumulating=accum > 1)
    s = shard(layout, setup, memory, gpus=2, sharding=f"zero{stage}", device="cpu")
    return {"estimated_bytes": s.peak_allocated_bytes, "peak_phase": s.peak_phase, "params": layout.total_params()}


def run_ranks(script: str, request: dict, port: int, label: str, world: int = 2) -> list[dict]:
    """Every rank of one case: `script --worker REQUEST` `world` times, each in its own process with glibc set
    for the RSS instrument; each rank's last stdout line, parsed as JSON."""
    env = {**os.environ, **GLIBC, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ranks = []
    with tempfile.TemporaryDirectory() as tmp:
        # each rank writes to files: a pipe nobody reads fills with DeepSpeed's logging and blocks that rank
        # inside a collective the other waits on
        logs = [(Path(tmp) / f"{r}.out", Path(tmp) / f"{r}.err") for r in range(world)]
        procs = []
        for r, (out, err) in enumerate(logs):
            with out.open("w") as o, err.open("w") as e:
                procs.append(subprocess.Popen([sys.executable, script, "--worker", json.dumps(request)], stdout=o,
                                              stderr=e, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        for proc, (out, err) in zip(procs, logs):
            if proc.wait(timeout=7200) != 0:
                raise RuntimeError(f"{label}: rank failed: {err.read_text().strip().splitlines()[-1:]}")
            ranks.append(json.loads(out.read_text().strip().splitlines()[-1]))
    return ranks


def run_case(case, index: int) -> dict:
    """Both ranks of one case (the `index`-th: its rendezvous port)."""
    cid, model, stage, setup_json, split = case
    ranks = run_ranks(__file__, {"stage": stage, "config": MODELS[model], "setup": setup_json}, 29900 + index, cid)
    return {"id": cid, "model": model, "stage": stage, "setup": setup_json, "split": split, "ranks": ranks,
            "measured_bytes": max(r["measured_bytes"] for r in ranks),
            "estimate_at_measure_bytes": estimate(model, stage, setup_json)["estimated_bytes"],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def error_summary(errors: dict[str, list[float]]) -> list[str]:
    """The summary table's lines: n, median and max |error| and how many within 3%, per split."""
    summary = ["| split | n | median abs error | max abs error | within 3% |", "|---|---|---|---|---|"]
    for split, errs in errors.items():
        if errs:
            errs = sorted(errs)
            summary.append(f"| {split} | {len(errs)} | {errs[len(errs) // 2]:.2f}% | {max(errs):.2f}% | "
                           f"{sum(e <= 3 for e in errs)}/{len(errs)} |")
    return summary


def report(records: list[dict]) -> str:
    """DEEPSPEED.md: each case with today's estimate, and the error summary per split."""
    rows, errors = [], {"train": [], "held-out": []}
    for r in records:
        e = estimate(r["model"], r["stage"], r["setup"])
        err = (e["estimated_bytes"] - r["measured_bytes"]) / r["measured_bytes"] * 100
        errors[r["split"]].append(abs(err))
        before = r.get("estimate_before_bytes")
        first = f"{(before - r['measured_bytes']) / r['measured_bytes'] * 100:+.2f}%" if before else "-"
        census = " / ".join(f"{x['census_bytes'] / 2**20:.1f}" for x in r["ranks"])
        rise = " / ".join(f"{x['rss_rise_bytes'] / 2**20:.1f}" for x in r["ranks"])
        rows.append(f"| {r['id']} | {r['split']} | {e['params'] / 1e6:.0f}M | {e['estimated_bytes'] / 2**20:.1f} | "
                    f"{r['measured_bytes'] / 2**20:.1f} | {err:+.2f}% | {first} | {census} | {rise} | {e['peak_phase']} |")
    versions = records[0]["ranks"][0] if records else {}
    return "\n".join([
        "# DeepSpeed ZeRO memory against DeepSpeed itself (CPU)", "",
        (f"Generated by `python benchmarks/deepspeed_cpu.py`: DeepSpeed {versions.get('deepspeed')}, torch "
        f"{versions.get('torch')}, two processes over gloo on DeepSpeed's CPU accelerator; cases measured "
        f"{records[0]['date'] if records else ''} onward. Method, instruments and held-out rule: the script's "
        "docstring. Estimate = `ftplan estimate --device cpu --gpus 2 --sharding zeroN` (today's model); "
        "measured = census + RSS rise of the larger process. Full fine-tuning, bf16-mixed (DeepSpeed bf16), "
        "fused AdamW, the Trainer's 'auto' buckets."), "",
        *error_summary(errors), "",
        ("| case | split | params | estimated MiB | measured MiB | error | error before measuring | census MiB "
         "(ranks) | RSS rise MiB (ranks) | estimated peak phase |"), "|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        ("'error before measuring': the model as it stood before DeepSpeed was first run here (commit "
         "fdb9641, read from DeepSpeed's source alone). The changes since were made from the three train cases "
         "before any held-out case had run, and - after four held-out results had been seen - from a review of "
         "DeepSpeed's source (ZeRO-3 sub-groups, ZeRO-1's reduction pass, tied heads, fp64 norms, recomputation "
         "in the reuse distance), which moved no measured case's estimate. The five -accum2 cases (optimizer steps "
         "over two micro-batches) were measured after gradient accumulation entered the model, all held out; "
         "with one micro-batch's memory, as before, the two 2x512 cases would read -12.50% (ZeRO-1: whole "
         "gradients held) and -6.60% (ZeRO-2: the gradient partition held)."),
        "",
        ("The /lora cases (r 16, all-linear) ran after the model learned that DeepSpeed's bf16 casts the whole "
         "PEFT model at every stage (adapters included, autocast off): ZeRO-1/2 +0.36% and +0.31% (ZeRO-2 read "
         "+4.73% on the autocast step it replaced, the model at commit f7e0150). ZeRO-3 LoRA first read -1.74% "
         "to +18.79% on four cases. A probe of the parameters ZeRO-3 holds gathered at the start of backward "
         "(llama-1k-2l, 1x256) found 55.95M without checkpointing - the head and the layers, not the "
         "embedding - and all 91.86M with it: PEFT makes the frozen embedding's output require grad only for "
         "gradient checkpointing (enable_input_require_grads), so without it the embedding has no backward use "
         "and is released after its forward. Excluding it alone read +3.20%, +11.36% and -4.26% (an earlier "
         "session's try, not kept), because ftplan also gave ZeRO-3 FSDP's working set (embeddings and head as "
         "one unit, plus a layer); ZeRO-3 fetches module by module with a 0.9 hidden^2 prefetch bucket, so the "
         "working set is one module's weights and the bucket. With both (the cases above the llama-1k-2l/zero3/"
         "lora/1x128 row were seen before), five cases were measured: 1x256-ckpt -0.56%, the tied 1x64 "
         "-1.16%, 1x128 -5.3% and the 10-layer model's -10.62% and -31.94%. 1x128 peaks in the forward: as the "
         "last layer's module prefetches the untied head, the resident set rose by the head's bf16 bytes and "
         "fell by them at the head's own fetch (gloo's all-gather holding a copy of its output; counted for the "
         "CPU only, so 1x128 now reads +0.15%, after being seen). The 10-layer cases are not understood: "
         "without checkpointing about 200 MiB more is resident at the end of the forward than the kept "
         "parameters (516.6M measured at the start of backward, 528M modelled), the head's copy and the "
         "activations - a census of tensors at the head's fetch found, beside the gathered weights, eight flat "
         "all-gather buffers of about one layer's modules (each a Linear's weight with its adapters, 107 MiB), "
         "whose owner and lifetime are not modelled; with checkpointing DeepSpeed keeps 505M where the reuse "
         "distance ftplan counts (a layer used three times: forward, recomputation, backward) keeps 374M. A "
         "probe of DeepSpeed's parameter coordinator in the second step (benchmarks/deepspeed_probe.py, "
         "which prints every figure of this paragraph) found why; the reuse "
         "distance does not decide it. Every module fetch prefetches at least one parameter, whatever its size "
         "against the 0.9 hidden^2 bucket (the loop checks the bucket before adding one). That includes the "
         "fetches of modules without parameters (dropouts, activations, PEFT's wrappers: 41 fetches per LoRA "
         "layer for 7 large weights). So the prefetch front runs ahead of the compute, bounded only by "
         "stage3_max_live_parameters (1e9): 288.7M parameters were already gathered at layer 1's first fetch. Once "
         "the whole forward was gathered, the front popped the backward's entries of gathered parameters without "
         "counting them (queue 603 to 116 entries in one fetch). Each parameter popped so takes its later use "
         "as the step it was 'fetched for' (layer 1's up projection: step 1132, its recomputation), and "
         "__params_to_release keeps it, though its traversal to that use (1,420M parameters) exceeds the 1e9 "
         "reuse distance. Layers 2-9, the head and part of layer 1 stay gathered. For a model over 1e9 "
         "parameters the same front would hold up to 1e9 gathered (2 GB in bf16) where ftplan counts a module "
         "and the bucket - unmeasured at that size, and not modelled: it needs the coordinator simulated over the "
         "module trace."),

        "",
        ("What this does not show: CUDA (NCCL's collectives, the fp64 norm copies, the caching allocator's "
         "rounding), more than two processes, partitions over 1e9 elements (ZeRO-3's sub-groups), gradient "
         "accumulation beyond the one model above, QLoRA under ZeRO, LoRA beyond the /lora cases above, offload, "
         "and DeepSpeed versions other than the one above."), ""])


def bench_main(doc: str, worker, cases: list, results: Path, report_path: Path, run_case, report) -> int:
    """The command line both sharded benchmarks share. `--worker REQUEST` runs one rank (`worker(request)`);
    otherwise every case not yet in `results` (with `--only`, those whose id contains it) runs through
    `run_case(case, index)` and is appended as it finishes, then `report(records)` is written in case order.
    `--report` only rewrites the report from the stored records."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="rewrite the report from the stored results")
    parser.add_argument("--only", help="run only cases whose id contains this")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if not args.report:
        done = {r["id"] for r in records}
        for i, case in enumerate(cases):
            if case[0] in done or (args.only and args.only not in case[0]):
                continue
            record = run_case(case, i)
            print(json.dumps({k: record[k] for k in ("id", "split", "measured_bytes")}), flush=True)
            records.append(record)
            results.parent.mkdir(exist_ok=True)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
    order = {c[0]: i for i, c in enumerate(cases)}
    report_path.write_text(report(sorted(records, key=lambda r: order.get(r["id"], len(order)))))
    print(f"wrote {report_path}")
    return 0


def main() -> int:
    return bench_main(__doc__, lambda r: worker(r["stage"], r["config"], r["setup"]), CASES, RESULTS, REPORT,
                      run_case, report)


if __name__ == "__main__":
    sys.exit(main())
