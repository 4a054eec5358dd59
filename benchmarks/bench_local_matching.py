"""local_matching vs the eager GLoRIA-style computation: time and peak memory of one
forward + backward.

    python benchmarks/bench_local_matching.py            # CPU: native backend; GPU: triton
    python benchmarks/bench_local_matching.py --quick    # small shapes only, no result files

The step: scores = matching(img, None, txt, txt_mask) with agg="lse", attn_scale 4,
agg_scale 5 (GLoRIA's γ1, γ2), then GLoRIA's local loss (symmetric cross-entropy of
10 · scores, γ3) and its gradient for img and txt. Shapes: B_i = B_t = B, Li = 98 regions,
Lt = 128 words (report lengths drawn in [32, 128]), E = 128, float32. "eager" writes the
matching batched, holding every [B, B, Lt, Li] and [B, B, Lt, E] tensor (3.3 and 4.3 GB
each at B = 256).

Peak memory on CPU, both above the inputs, each in a fresh subprocess, by two methods:
* counted (tracemalloc-like): the most bytes of tensor storages alive at once, summed over
  the outputs of every aten op (a TorchDispatchMode; a storage counts until it is freed;
  the native backend's custom ops run their Python bodies so their blocks count) while the
  step runs on the meta device, where nothing is allocated. This counts the eager
  computation at the acceptance shape B = 256, which this shared 2-core, 23 GB machine
  cannot hold (it needs ~31 GiB).
* RSS: glibc's mmap threshold fixed at 128 KiB so that freed tensors leave the resident
  set, the peak resident set reset (/proc/self/clear_refs), one step, then VmHWM minus
  VmRSS before the step. Run at the `--real-batches` sizes for both; there it checks the
  count (rss_vs_counted).
On a GPU: torch.cuda peak allocated above the inputs.
Time: median wall time of `--repeats` steps (the RSS-measured step first), one thread. The
machine is shared with other jobs at higher priority: times are indicative, memory is not.
Results: benchmarks/results/local_matching-<device>-<date>.{json,csv}.
"""
import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_bytes, print_table, time_ms, write_results  # noqa: E402

import mcr_kernels  # noqa: E402

blockwise = importlib.import_module("mcr_kernels.blockwise.local_matching")
DIMS = dict(Li=98, Lt=128, E=128)
ATTN_SCALE, AGG_SCALE, LOSS_SCALE = 4.0, 5.0, 10.0
ACCEPTANCE_B = 256
GB = 2 ** 30


def eager_scores(img, img_mask, txt, txt_mask):
    """GLoRIA's word-to-region matching, batched over every image and report."""
    v, w = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    attn = ATTN_SCALE * torch.einsum("ile,jke->ijkl", v, w)           # [B_i, B_t, Lt, Li]
    if img_mask is not None:
        attn = attn.masked_fill(~img_mask[:, None, None], float("-inf"))
    attn = attn.softmax(-1)
    context = torch.einsum("ijkl,ile->ijke", attn, v)                 # [B_i, B_t, Lt, E]
    sim = F.cosine_similarity(context, w.unsqueeze(0), dim=-1)         # [B_i, B_t, Lt]
    sim = (AGG_SCALE * sim).masked_fill(~txt_mask[None], float("-inf"))
    return sim.logsumexp(-1) / AGG_SCALE


def op_scores(img, img_mask, txt, txt_mask):
    return mcr_kernels.local_matching(img, img_mask, txt, txt_mask, attn_scale=ATTN_SCALE,
                                      agg="lse", agg_scale=AGG_SCALE)


IMPLS = {"eager": eager_scores, "local_matching": op_scores}


def make_inputs(B, device):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(B, DIMS["Li"], DIMS["E"], generator=g).to(device).requires_grad_()
    txt = torch.randn(B, DIMS["Lt"], DIMS["E"], generator=g).to(device).requires_grad_()
    lengths = torch.randint(DIMS["Lt"] // 4, DIMS["Lt"] + 1, (B, 1), generator=g)
    txt_mask = (torch.arange(DIMS["Lt"])[None] < lengths).to(device)
    return img, txt, txt_mask


def step_fn(scores_fn, inputs):
    img, txt, txt_mask = inputs

    def step():
        logits = LOSS_SCALE * scores_fn(img, None, txt, txt_mask)
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return loss.detach(), torch.autograd.grad(loss, (img, txt))
    return step


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created under the mode and alive at the same time.

    The native backend's custom ops are run through their Python implementations, so the
    blocks they allocate are counted too (on meta tensors a custom op would run its fake)."""

    IMPLEMENTATIONS = {torch.ops.mcr_kernels.local_matching_blockwise.default:
                       blockwise.local_matching_blockwise._init_fn,
                       torch.ops.mcr_kernels.local_matching_blockwise_backward.default:
                       blockwise.local_matching_blockwise_backward._init_fn}

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.IMPLEMENTATIONS:
            with self:
                return self.IMPLEMENTATIONS[func](*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def counted_peak(impl, B):
    """Counted peak bytes of one step on the meta device (nothing allocated)."""
    inputs = make_inputs_meta(B)
    with mcr_kernels.use_backend("blockwise", "local_matching"), LiveStorageBytes() as mode:
        step_fn(IMPLS[impl], inputs)()
    return mode.peak


def make_inputs_meta(B):
    img = torch.empty(B, DIMS["Li"], DIMS["E"], device="meta", requires_grad=True)
    txt = torch.empty(B, DIMS["Lt"], DIMS["E"], device="meta", requires_grad=True)
    return img, txt, torch.ones(B, DIMS["Lt"], dtype=torch.bool, device="meta")


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def child(method, impl, B, repeats):
    """Run in a fresh process. "counted": the counted peak on meta. "rss": the RSS peak
    above the inputs of one step and the median time of that step and repeats - 1 more (a
    step at B = 2 first does the lazy initialisations)."""
    if method == "counted":
        return print(json.dumps({"counted_peak": counted_peak(impl, B)}))
    step_fn(IMPLS[impl], make_inputs(2, "cpu"))()
    step = step_fn(IMPLS[impl], make_inputs(B, "cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss, _ = step()
    times = [(time.perf_counter() - start) * 1e3]
    peak = (_status_kib("VmHWM") - before) * 1024
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"rss_peak": peak, "ms": statistics.median(times), "loss": loss.item()}))


def run_child(method, impl, B, repeats=1):
    """child() in a fresh interpreter, one thread (on a shared machine two threads wait for
    each other at every parallel region); glibc returns every block of >= 128 KiB to the
    system on free (fixed mmap threshold), so the resident set follows the live tensors."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, impl, str(B),
                          str(repeats)], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_rows(batches, real_batches, repeats):
    rows = []
    for B in batches:
        for impl in IMPLS:
            row = dict(B=B, impl=impl, backend="blockwise" if impl == "local_matching" else "",
                       counted_peak_mib=run_child("counted", impl, B)["counted_peak"] / 2 ** 20)
            if B in real_batches:
                res = run_child("rss", impl, B, repeats)
                row.update(rss_peak_mib=res["rss_peak"] / 2 ** 20, ms=res["ms"], loss=res["loss"],
                           rss_vs_counted=res["rss_peak"] / 2 ** 20 / row["counted_peak_mib"])
            rows.append(row)
            print_table([row])
        eager, fused = rows[-2], rows[-1]
        fused["counted_peak_vs_eager"] = fused["counted_peak_mib"] / eager["counted_peak_mib"]
        if B in real_batches:
            fused["rss_peak_vs_eager"] = fused["rss_peak_mib"] / eager["rss_peak_mib"]
            fused["time_vs_eager"] = fused["ms"] / eager["ms"]
    return rows


def gpu_rows(batches, repeats):
    rows = []
    for B in batches:
        inputs = make_inputs(B, "cuda")
        results = {}
        for impl, fn in IMPLS.items():
            with mcr_kernels.use_backend("triton", "local_matching"):
                step = step_fn(fn, inputs)
                try:
                    results[impl] = dict(peak_mib=peak_bytes(step) / 2 ** 20, ms=time_ms(step, repeats=repeats))
                except torch.OutOfMemoryError:
                    results[impl] = dict(status="oom")
                    torch.cuda.empty_cache()
            rows.append(dict(B=B, impl=impl, backend="triton" if impl != "eager" else "", **results[impl]))
        eager, fused = results["eager"], results["local_matching"]
        if "ms" in eager and "ms" in fused:
            rows[-1].update(peak_vs_eager=fused["peak_mib"] / eager["peak_mib"],
                            time_vs_eager=fused["ms"] / eager["ms"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B = 4 and 8 only, no result files")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="B values (default 16 32 64 256)")
    parser.add_argument("--real-batches", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                        help="B values at which both are also run for real on CPU (RSS and time)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per B (the measured one first)")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "IMPL", "B", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
    batches = args.batches or ([4, 8] if args.quick else [16, 32, 64, ACCEPTANCE_B])
    if torch.cuda.is_available():
        rows = gpu_rows(batches, args.repeats)
        extra = {"peak_method": "torch.cuda.max_memory_allocated above the inputs"}
    else:
        rows = cpu_rows(batches, set(args.real_batches), args.repeats)
        at = [r for r in rows if r["B"] == ACCEPTANCE_B and r["impl"] == "local_matching"]
        extra = {"peak_method": "each in a fresh subprocess: counted live tensor-storage bytes on the meta "
                                "device (TorchDispatchMode); RSS high-water mark (VmHWM after clear_refs)",
                 "block_elements": blockwise.BLOCK_ELEMENTS, "threads": 1,
                 "counted_peak_vs_eager_at_B256":
                     at[0]["counted_peak_vs_eager"] if at else None}
    print_table(rows)
    if not args.quick:
        extra.update(shapes=DIMS, attn_scale=ATTN_SCALE, agg_scale=AGG_SCALE, loss_scale=LOSS_SCALE)
        print("wrote", *write_results("local_matching", rows, extra=extra))


if __name__ == "__main__":
    main()
