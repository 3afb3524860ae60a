"""Why ZeRO-3 keeps more parameters gathered than ftplan's reuse distance counts: a probe of DeepSpeed's parameter
coordinator in the second step of one benchmarks/deepspeed_cpu.py case (two gloo processes, as that script runs
them), printing the figures benchmarks/DEEPSPEED.md and the README quote.

Usage: python benchmarks/deepspeed_probe.py [--case llama-2k-10l/zero3/lora/1x64-ckpt]   (about 4 minutes)

Prints, from process 0: the parameters gathered at the start of the second backward, by layer, beside
ftplan.estimate.deepspeed.kept_params; module fetches per decoder layer in DeepSpeed's recorded trace; the
parameters already gathered at layer 1's first fetch; the largest drop of the prefetch queue in one fetch; and,
for layer 1's up projection, the step it was 'fetched for' when released and the parameters the reuse-distance
traversal crosses before its next use (against stage3_max_reuse_distance, 1e9). It reads the coordinator's
private state (DeepSpeed 0.19.8's PartitionedParameterCoordinator).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import deepspeed_cpu as bench  # noqa: E402 - benchmarks/ is not a package

CASE = "llama-2k-10l/zero3/lora/1x64-ckpt"
PROBED = "layers.1.mlp.up_proj.base_layer"  # the first weight DeepSpeed kept in the probe
C = "_PartitionedParameterCoordinator__"  # the coordinator's private attributes


def _layer(name: str) -> str:
    parts = name.split(".")
    index = next((p for p in parts if p.isdigit()), None)
    return f"layer {index}" if index is not None else name.rsplit(".", 2)[-2]


def _probe(seen: dict) -> None:
    """Patch DeepSpeed's engine and coordinator to record the second step (the first runs on no trace)."""
    import deepspeed
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    engine, coordinator = deepspeed.runtime.engine.DeepSpeedEngine, ppc.PartitionedParameterCoordinator
    run_forward, backward, fetch = engine.forward, engine.backward, coordinator.fetch_sub_module
    release = getattr(coordinator, C + "params_to_release")
    seen.update(backwards=0, step=0, fetches=[], released={})  # step: the forward running (0 in a backward)

    def on_forward(self, *args, **kwargs):
        seen["step"] = seen["backwards"] + 1
        return run_forward(self, *args, **kwargs)

    def on_backward(self, loss, *args, **kwargs):
        seen["backwards"] += 1
        seen["step"] = 0
        if seen["backwards"] == 2:  # the second step's forward is done
            by_layer: dict = defaultdict(int)
            for name, p in self.module.named_parameters():
                if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE:
                    by_layer[_layer(name)] += p.ds_numel
            names = {id(m): n for n, m in self.module.named_modules()}
            order = getattr(self.optimizer.parameter_offload.get_param_coordinator(), C + "submodule_order")
            seen["kept"] = dict(by_layer)
            seen["released"] = {names[key]: value for key, value in seen["released"].items() if key in names}
            seen["trace"] = [(names.get(id(m), ""), sum(p.ds_numel for p in m.parameters(recurse=False)))
                             for m in order]
        return backward(self, loss, *args, **kwargs)

    def on_fetch(self, module, *args, **kwargs):
        def queue() -> int:
            return len(getattr(self, C + "param_queue") or [])

        before, available = queue(), getattr(self, C + "n_available_params")
        out = fetch(self, module, *args, **kwargs)
        if seen["step"] == 2:  # (step id, queue before, queue after, parameters gathered before)
            seen["fetches"].append((getattr(self, C + "step_id") - 1, before, queue(), available))
        return out

    def on_release(self, module, step_id):
        out = release(self, module, step_id)
        if seen["step"] == 2:
            recent = getattr(self, C + "most_recent_step_id_param_fetched_for")
            for p in module.parameters(recurse=False):
                seen["released"][id(module)] = (step_id, recent[p], p.ds_id in out)  # named at the backward
        return out

    engine.forward, engine.backward, coordinator.fetch_sub_module = on_forward, on_backward, on_fetch
    setattr(coordinator, C + "params_to_release", on_release)


def worker(request: dict) -> dict:
    seen: dict = {}
    _probe(seen)
    import torch

    bench.worker(request["stage"], request["config"], request["setup"])
    if torch.distributed.get_rank() != 0:
        return {"rank": 1}
    return {"rank": 0, "kept": seen["kept"], "trace": seen["trace"], "fetches": seen["fetches"],
            "released": {k: v for k, v in seen["released"].items() if k.endswith(PROBED)}}


def report(rank0: dict, model: str, setup_json: dict) -> None:
    from ftplan.estimate import deepspeed as ds
    from ftplan.model.architectures import build_layout
    from ftplan.model.spec import spec_from_config

    trace = rank0["trace"]
    layout = build_layout(spec_from_config(bench.MODELS[model], name=model, source="benchmark"))
    setup, _ = bench._parse(setup_json)
    print(f"gathered at the start of the second backward: {sum(rank0['kept'].values()) / 1e6:.1f}M parameters "
          f"(ftplan's kept_params: {ds._kept(layout, setup) / 1e6:.1f}M)")
    for key, numel in sorted(rank0["kept"].items(), key=lambda kv: -kv[1]):
        print(f"  {key}: {numel / 1e6:.3f}M")
    starts = [next(i for i, (name, _) in enumerate(trace) if f".layers.{k}." in name)
              for k in range(layout.dims.layers)]  # each layer's first fetch in the forward
    print(f"module fetches per decoder layer in the forward: {sorted({b - a for a, b in zip(starts, starts[1:])})}")
    at_layer1 = next(f for f in rank0["fetches"] if f[0] >= starts[1])
    print(f"gathered at layer 1's first fetch (step {at_layer1[0]}): {at_layer1[3] / 1e6:.1f}M parameters")
    drop = max(rank0["fetches"], key=lambda f: f[1] - f[2])
    print(f"largest prefetch-queue drop in one fetch: {drop[1]} -> {drop[2]} entries at step {drop[0]}")
    uses = [i for i, (name, _) in enumerate(trace) if name.endswith(PROBED)]
    crossed = sum(numel for _, numel in trace[uses[0] + 1:uses[1]])
    (step, fetched_for, released), = rank0["released"].values()
    print(f"{PROBED}: used at steps {uses}; at its release (step {step}) it was 'fetched for' step {fetched_for}, "
          f"released: {released}; the reuse traversal crosses {crossed / 1e6:,.1f}M parameters before its next "
          "use (stage3_max_reuse_distance 1e9)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default=CASE)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    cid, model, stage, setup_json, _ = next(c for c in bench.CASES if c[0] == args.case)
    ranks = bench.run_ranks(__file__, {"stage": stage, "config": bench.MODELS[model], "setup": setup_json}, 29970,
                            cid)
    report(next(r for r in ranks if r["rank"] == 0), model, setup_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
