"""Half-precision matmuls and CPU flash attention as blocked fp32 kernels, for measuring on CPUs without bf16
instructions. Benchmark tooling only: ftplan itself never imports this.

Why: on a CPU without AVX512-BF16 or AMX (this project's AVX2 hosts), torch runs bf16/fp16 `mm`, `addmm`,
`bmm`, `baddbmm` and the CPU flash-attention kernels through a reference gemm at about 0.25 GFLOP/s - a
real-width 7B training step would take hours - while fp32 gemm runs at tens of GFLOP/s. `install()` registers
replacements for those aten ops at the CPU dispatch key. They

- return exactly what the native kernels return: the same shapes, dtypes and strides (flash attention's output
  in the query's memory order, its gradients in (batch, seq, heads, dim) order, logsumexp in (batch, seq,
  heads) order; checked against the native kernels by `check()`), so every op around them allocates what it
  would natively;
- sit below autograd, autocast and Python dispatch modes, so ftplan's tracker sees them as native ops;
- allocate their own scratch (fp32 tiles) through the c10 allocator and free it before returning, never more
  than `SCRATCH_BOUND_BYTES` at once - the allocator and RSS instruments do see it, which is why it is bounded.

Numerics: fp32 accumulation, rounded once to the output dtype (checked by `check()`).

`python benchmarks/cpu_bf16.py` runs the check; benchmarks/site/sitecustomize.py installs the kernels into a
measured process when FTPLAN_BENCH_CPU_BF16=1 (benchmarks/accuracy.py sets it only where `needed()`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# matmul: a 512 x 512 fp32 accumulator block of the output (1 MiB), summed over 2048-deep slices (fp32 copies
# of a and b, 4 MiB each); deep slices keep fp32 gemm efficient (the accumulator is read and written once per
# slice), measured ~24 GFLOP/s here against ~12 with 256-deep ones
OUT_TILE = 512
DEPTH_TILE = 2048
ATTN_BLOCK = 256   # attention block edge (queries x keys)
HALF = (torch.bfloat16, torch.float16)
# Largest scratch either kernel holds at once: matmul the accumulator and one slice pair; attention two
# ATTN_BLOCK^2 fp32 blocks, six ATTN_BLOCK x head_dim fp32 blocks (head_dim <= 256) and a bool causal block.
SCRATCH_BOUND_BYTES = max(4 * OUT_TILE * (OUT_TILE + 2 * DEPTH_TILE),
                          2 * ATTN_BLOCK ** 2 * 4 + 6 * ATTN_BLOCK * 256 * 4 + ATTN_BLOCK ** 2)
_library = None


def needed() -> bool:
    """True on a CPU whose flags lack avx512_bf16 and amx_bf16: torch's bf16 gemm is the slow reference there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" not in flags and "amx_bf16" not in flags


def _gemm_into(out, a, b, bias=None, beta=1.0, alpha=1.0):
    """out = beta * bias + alpha * (a @ b) for 2-D half tensors, one OUT_TILE x OUT_TILE fp32 block of out at a
    time, summed over DEPTH_TILE-deep slices (the fp32 copies of a and b are converted once per block pair: wide
    output blocks, not deep slices, are what amortise the conversion)."""
    m, k = a.shape
    n = b.shape[1]
    for i in range(0, m, OUT_TILE):
        for j in range(0, n, OUT_TILE):
            acc = torch.zeros((min(OUT_TILE, m - i), min(OUT_TILE, n - j)), dtype=torch.float32)
            for p in range(0, k, DEPTH_TILE):
                a32, b32 = a[i:i + OUT_TILE, p:p + DEPTH_TILE].float(), b[p:p + DEPTH_TILE, j:j + OUT_TILE].float()
                acc.addmm_(a32, b32)
                del a32, b32  # free before the next pair is made: the bound counts one pair
            if alpha != 1:
                acc.mul_(alpha)
            if bias is not None and beta != 0:  # a half-precision view added in place: no fp32 copy of the bias
                acc.add_(bias.expand(m, n)[i:i + OUT_TILE, j:j + OUT_TILE], alpha=beta)
            out[i:i + OUT_TILE, j:j + OUT_TILE].copy_(acc)
            del acc
    return out


def mm(a, b):
    """aten::mm; fp32 and other dtypes go to the untouched out= kernel."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    return _gemm_into(out, a, b) if a.dtype in HALF else torch.mm(a, b, out=out)


def addmm(bias, a, b, *, beta=1, alpha=1):
    """aten::addmm (nn.Linear with a bias)."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    if a.dtype not in HALF:
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha, out=out)
    return _gemm_into(out, a, b, bias, beta, alpha)


def bmm(a, b):
    """aten::bmm (eager attention)."""
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype)
    if a.dtype not in HALF:
        return torch.bmm(a, b, out=out)
    for i in range(a.shape[0]):
        _gemm_into(out[i], a[i], b[i])
    return out


def baddbmm(bias, a, b, *, beta=1, alpha=1):
    """aten::baddbmm (BLOOM's ALiBi scores)."""
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype)
    if a.dtype not in HALF:
        return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha, out=out)
    bias = bias.expand(out.shape)
    for i in range(a.shape[0]):
        _gemm_into(out[i], a[i], b[i], bias[i], beta, alpha)
    return out


def _bshd(shape, dtype):
    """An empty (B, H, S, D) tensor laid out as (B, S, H, D), as the native flash kernels return theirs."""
    b, h, s, d = shape
    return torch.empty((b, s, h, d), dtype=dtype).transpose(1, 2)


class _Attention:
    """One (batch, head) pair's blocks: scores of a query block against a key block, masked as the op says."""

    def __init__(self, query, key, value, is_causal, attn_mask, scale):
        self.q, self.k, self.v = query, key, value
        self.causal, self.mask = is_causal, attn_mask
        self.scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        self.group = query.shape[1] // key.shape[1]  # grouped-query attention: query heads per key head

    def keys_for(self, i: int) -> int:
        """How many keys the query block starting at row i can see."""
        return min(self.k.shape[2], i + ATTN_BLOCK) if self.causal else self.k.shape[2]

    def scores(self, q32, b, h, i, j, k32):
        """scale * q k^T for queries i.. and keys j.. in fp32, with the mask and the causal triangle applied."""
        s = (q32 @ k32.transpose(0, 1)).mul_(self.scale)
        if self.mask is not None:
            m = self.mask.expand(self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2])
            m = m[b, h, i:i + s.shape[0], j:j + s.shape[1]]
            s.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else s.add_(m)
        if self.causal and j + s.shape[1] > i + 1:
            rows = torch.arange(i, i + s.shape[0]).unsqueeze(1)
            above = torch.arange(j, j + s.shape[1]).unsqueeze(0) > rows
            s.masked_fill_(above, float("-inf"))
            del above, rows
        return s


def flash_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """aten::_scaled_dot_product_flash_attention_for_cpu: online softmax over key blocks, one query block at a
    time. Returns (output, logsumexp) as the native kernel lays them out."""
    if dropout_p > 0:
        raise RuntimeError("the CPU flash attention kernel has no dropout (SDPA takes the math path for it)")
    att = _Attention(query, key, value, is_causal, attn_mask, scale)
    batch, heads, length, dim = query.shape
    out = torch.empty_like(query)  # the native kernel's output follows the query's memory order
    lse = torch.empty((batch, length, heads), dtype=torch.float32).transpose(1, 2)
    for b in range(batch):
        for h in range(heads):
            kh = h // att.group
            for i in range(0, length, ATTN_BLOCK):
                q32 = query[b, h, i:i + ATTN_BLOCK].float()
                rows = q32.shape[0]
                acc = torch.zeros((rows, dim), dtype=torch.float32)
                top = torch.full((rows,), float("-inf"))
                total = torch.zeros(rows)
                for j in range(0, att.keys_for(i), ATTN_BLOCK):
                    k32, v32 = key[b, kh, j:j + ATTN_BLOCK].float(), value[b, kh, j:j + ATTN_BLOCK].float()
                    p = att.scores(q32, b, h, i, j, k32)
                    new_top = torch.maximum(top, p.amax(-1))
                    safe = new_top.masked_fill(torch.isinf(new_top), 0.0)  # rows masked so far: no NaN
                    p.sub_(safe.unsqueeze(1)).exp_()
                    rescale = (top - safe).exp_()
                    total.mul_(rescale).add_(p.sum(-1))
                    acc.mul_(rescale.unsqueeze(1)).addmm_(p, v32)
                    top = new_top
                    del p, k32, v32
                out[b, h, i:i + rows].copy_(acc.div_(total.unsqueeze(1)))
                lse[b, h, i:i + rows].copy_(top + total.log())
                del acc, q32
    return out, lse


def _probabilities(att, q32, b, h, i, j, k32, lse_rows):
    """Softmax probabilities of a query block against a key block, rebuilt from the forward's logsumexp."""
    p = att.scores(q32, b, h, i, j, k32)
    return p.sub_(lse_rows.unsqueeze(1)).exp_()


def _query_block(att, grad_out, out, lse, b, h, i):
    """fp32 copies of a query block's queries and output gradient, its logsumexp (+inf where every key was
    masked, so its probabilities are 0) and delta = rowsum(dO * O)."""
    q32 = att.q[b, h, i:i + ATTN_BLOCK].float()
    do32 = grad_out[b, h, i:i + ATTN_BLOCK].float()
    lse_rows = lse[b, h, i:i + ATTN_BLOCK].float()
    lse_rows = lse_rows.masked_fill(torch.isinf(lse_rows), float("inf"))
    delta = (do32 * out[b, h, i:i + ATTN_BLOCK].float()).sum(-1, keepdim=True)
    return q32, do32, lse_rows, delta


def flash_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                   scale=None):
    """aten::_scaled_dot_product_flash_attention_for_cpu_backward: key and value gradients accumulated per key
    block over the query blocks that see it, then query gradients per query block; gradients in the native
    (batch, seq, heads, dim) memory order."""
    att = _Attention(query, key, value, is_causal, attn_mask, scale)
    batch, heads, length, dim = query.shape
    grad_q, grad_k, grad_v = (_bshd(t.shape, t.dtype) for t in (query, key, value))
    for b in range(batch):
        for kh in range(key.shape[1]):
            for j in range(0, key.shape[2], ATTN_BLOCK):
                k32, v32 = key[b, kh, j:j + ATTN_BLOCK].float(), value[b, kh, j:j + ATTN_BLOCK].float()
                dk = torch.zeros_like(k32)
                dv = torch.zeros_like(v32)
                for h in range(kh * att.group, (kh + 1) * att.group):
                    for i in range(0, length, ATTN_BLOCK):
                        if att.keys_for(i) <= j:
                            continue
                        q32, do32, lse_rows, delta = _query_block(att, grad_out, out, logsumexp, b, h, i)
                        p = _probabilities(att, q32, b, h, i, j, k32, lse_rows)
                        dv.addmm_(p.transpose(0, 1), do32)
                        ds = (do32 @ v32.transpose(0, 1)).sub_(delta).mul_(p).mul_(att.scale)
                        del p
                        dk.addmm_(ds.transpose(0, 1), q32)
                        del ds, q32, do32, lse_rows, delta
                grad_k[b, kh, j:j + ATTN_BLOCK].copy_(dk)
                grad_v[b, kh, j:j + ATTN_BLOCK].copy_(dv)
                del dk, dv, k32, v32
        for h in range(heads):
            kh = h // att.group
            for i in range(0, length, ATTN_BLOCK):
                q32, do32, lse_rows, delta = _query_block(att, grad_out, out, logsumexp, b, h, i)
                dq = torch.zeros_like(q32)
                for j in range(0, att.keys_for(i), ATTN_BLOCK):
                    k32, v32 = key[b, kh, j:j + ATTN_BLOCK].float(), value[b, kh, j:j + ATTN_BLOCK].float()
                    p = _probabilities(att, q32, b, h, i, j, k32, lse_rows)
                    ds = (do32 @ v32.transpose(0, 1)).sub_(delta).mul_(p).mul_(att.scale)
                    del p, v32
                    dq.addmm_(ds, k32)
                    del ds, k32
                grad_q[b, h, i:i + dq.shape[0]].copy_(dq)
                del dq, q32, do32, lse_rows, delta
    return grad_q, grad_k, grad_v


def install() -> None:
    """Register the kernels for the process (idempotent). The Library object must stay alive: it holds them."""
    global _library
    if _library is not None:
        return
    import warnings

    warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")  # replacing a CPU kernel is the point
    _library = torch.library.Library("aten", "IMPL")
    for name, fn in [("mm", mm), ("addmm", addmm), ("bmm", bmm), ("baddbmm", baddbmm),
                     ("_scaled_dot_product_flash_attention_for_cpu", flash_forward),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", flash_backward)]:
        _library.impl(name, fn, "CPU")


def installed() -> bool:
    return _library is not None


def _cases():
    """Small inputs for every replaced op: (name, op, args, kwargs)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = r(2, 8, 300, 64), r(2, 2, 300, 64), r(2, 2, 300, 64)  # GQA, lengths not a multiple of a block
    q_bshd = r(2, 300, 8, 64).transpose(1, 2)  # as a model hands it over: a transposed projection
    keep = torch.rand(2, 1, 300, 300, generator=g) > 0.2  # a padding-style mask; SDPA hands it over as floats
    keep[..., 0] = True
    random_mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf")).bfloat16()
    float_mask = torch.zeros(1, 1, 300, 300).masked_fill_(torch.ones(300, 300, dtype=torch.bool).triu_(1),
                                                          float("-inf")).bfloat16()
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return [("mm", torch.ops.aten.mm, (r(700, 1100), r(1100, 600).t().contiguous().t()), {}),
            ("addmm", torch.ops.aten.addmm, (r(600), r(700, 1100), r(1100, 600)), {"beta": 0.5, "alpha": 2.0}),
            ("mm fp16", torch.ops.aten.mm, (r(300, 200, dtype=torch.float16), r(200, 100, dtype=torch.float16)), {}),
            ("bmm", torch.ops.aten.bmm, (r(4, 300, 64), r(4, 64, 300)), {}),
            ("baddbmm", torch.ops.aten.baddbmm, (r(4, 1, 300), r(4, 300, 64), r(4, 64, 300)), {"beta": 1.0,
                                                                                            "alpha": 0.125}),
            ("flash causal gqa", flash, (q, k, v, 0.0, True), {}),
            ("flash transposed q", flash, (q_bshd, r(2, 8, 300, 64), r(2, 8, 300, 64), 0.0, True), {}),
            ("flash random mask", flash, (q, k, v, 0.0, False), {"attn_mask": random_mask}),
            ("flash float mask", flash, (q, k, v, 0.0, False), {"attn_mask": float_mask, "scale": 0.1})]


def _compare(label, native, ours) -> float:
    """Relative error of ours against the native kernel's result; raises on any layout difference."""
    native = native if isinstance(native, (tuple, list)) else (native,)
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    worst = 0.0
    for a, b in zip(native, ours, strict=True):
        if (a.shape, a.stride(), a.dtype) != (b.shape, b.stride(), b.dtype):
            raise AssertionError(f"{label}: native {a.shape} {a.stride()} {a.dtype}, ours {b.shape} {b.stride()} "
                                 f"{b.dtype}")
        a32, b32 = a.float(), b.float()
        worst = max(worst, ((a32 - b32).norm() / a32.norm().clamp_min(1e-12)).item())
    return worst


def check(tolerance: float = 1e-2) -> dict[str, float]:
    """Run every replaced op natively, then with these kernels: identical shapes, strides and dtypes, values
    within `tolerance` (relative Frobenius error). Must run in a process where install() has not run yet."""
    if installed():
        raise RuntimeError("check() compares with the native kernels: run it before install()")
    cases = _cases()
    flash_back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    native = []
    for _, op, args, kwargs in cases:
        result = op(*args, **kwargs)
        back = None
        if isinstance(result, tuple):  # the flash forward: also its backward from the same output
            grad = torch.randn(result[0].shape, generator=torch.Generator().manual_seed(1)).bfloat16()
            back = (grad, flash_back(grad, *args[:3], *result, args[3], args[4], **kwargs))
        native.append((result, back))
    install()
    errors = {}
    for (label, op, args, kwargs), (result, back) in zip(cases, native):
        errors[label] = _compare(label, result, op(*args, **kwargs))
        if back is not None:
            ours = flash_back(back[0], *args[:3], *result, args[3], args[4], **kwargs)
            errors[label + " backward"] = _compare(label + " backward", back[1], ours)
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        raise AssertionError(f"relative error over {tolerance}: {bad}")
    return errors


def _allocation_peak(prof) -> int:
    """Highest running sum of the CPU allocator's events in a profile (bytes allocated and not yet freed)."""
    from torch._C._profiler import _EventType

    events = []

    def walk(node):
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def scratch_peak() -> dict[str, int]:
    """Largest scratch each kind of kernel holds at once (bytes beyond its outputs), measured by the profiler's
    allocator events at the widths of a 7B model: the figure ACCURACY.md quotes."""
    install()
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(1024, 4096, generator=g).bfloat16(), torch.randn(11008, 4096, generator=g).bfloat16()
    q, k, v = (torch.randn(1, 4, 1024, 128, generator=g).bfloat16() for _ in range(3))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(q, k, v, 0.0, True)
    runs = {"mm 1024x4096 @ 4096x11008": lambda: torch.mm(a, w.t()),
            "addmm, the same with a bias": lambda: torch.addmm(w[0], a, w[:4096].t()),
            "flash forward 4 heads x 1024 x 128": lambda: flash(q, k, v, 0.0, True),
            "flash backward": lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                out, q, k, v, out, lse, 0.0, True)}
    peaks = {}
    for label, run in runs.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            result = run()
        outputs = sum(t.untyped_storage().nbytes() for t in (result if isinstance(result, tuple) else (result,)))
        peaks[label] = _allocation_peak(prof) - outputs
        del result
    return peaks


if __name__ == "__main__":
    for name, err in check().items():
        print(f"{name:32s} same layout as native, relative error {err:.2e}")
    for name, size in scratch_peak().items():
        print(f"{name:40s} scratch peak {size / 2**20:.2f} MiB (bound {SCRATCH_BOUND_BYTES / 2**20:.2f} MiB)")
