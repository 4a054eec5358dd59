"""What every benchmark here shares: timing, peak memory, the device's copy bandwidth and
bf16 matmul rate, and result files with device, versions and date.

    t = time_ms(fn)                       # median ms over repeats (CUDA events on GPU)
    ms, peak = time_and_peak(fn)          # + peak bytes allocated during one call (GPU)
    peak = cpu_peak_bytes(fn)             # peak resident bytes added by one call (CPU, see there)
    write_results("patch_drop", rows)     # benchmarks/results/patch_drop-<device>-<date>.{json,csv}
"""
import csv
import datetime
import gc
import json
import pathlib
import platform
import statistics
import time

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def device_name(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment():
    """Device, versions and date: stored beside every result row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, *, warmup=10, repeats=50):
    """Median wall time of fn() in milliseconds (CUDA events when a GPU is present)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bytes(fn):
    """Peak GPU bytes allocated during one fn() above what was allocated before (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync()
    return torch.cuda.max_memory_allocated() - before


# glibc returns every freed block of 64 KiB or more to the kernel in a process started with
# this environment, so that its resident memory follows the live allocations of torch's CPU
# allocator (which is malloc): set it when starting a process that calls cpu_peak_bytes.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def saved_mib(forward, inputs):
    """MiB of the tensors autograd keeps for backward from forward() (one count per storage;
    the storages of `inputs`, e.g. the inputs and parameters, excluded): what a model holds
    between its forward and backward passes, counted exactly on any device."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values()) / 2**20


def autograd_vs_recompute(op_name, op, inputs, repeats):
    """[{config, ms, saved_mib, time_vs_autograd, saved_vs_autograd}] for "autograd" (op_name on
    its `reference` backend) and "recompute" (the default backend): forward + backward of
    op(*inputs), median of `repeats` passes, the two taking turns; saved_mib as saved_mib()."""
    import mcr_kernels

    backends = {"autograd": "reference", "recompute": None}

    def forward(config):
        with mcr_kernels.use_backend(backends[config], op_name):
            return op(*inputs)

    def forward_backward(config):
        for t in inputs:
            t.grad = None
        forward(config).sum().backward()
        _sync()

    configs = list(backends)
    for config in configs:
        forward_backward(config)  # warm-up
    times = {c: [] for c in configs}
    for r in range(repeats):
        for config in configs[r % 2:] + configs[:r % 2]:
            t0 = time.perf_counter()
            forward_backward(config)
            times[config].append(1e3 * (time.perf_counter() - t0))
    rows = [{"config": c, "ms": statistics.median(times[c]), "saved_mib": saved_mib(lambda c=c: forward(c), inputs)}
            for c in configs]
    for row in rows:
        row["time_vs_autograd"] = row["ms"] / rows[0]["ms"]
        row["saved_vs_autograd"] = row["saved_mib"] / rows[0]["saved_mib"]
    return rows


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_bytes(fn):
    """Peak resident memory that one fn() adds, in bytes (Linux): the kernel's high-water mark
    VmHWM, reset through /proc/self/clear_refs, minus the resident memory before the call.
    Meaningful in a fresh process started with CPU_MALLOC_ENV."""
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def time_and_peak(fn, **kw):
    return time_ms(fn, **kw), peak_bytes(fn)


def copy_bandwidth_gbs(num_bytes=1 << 30):
    """Measured device-to-device copy rate in GB/s (bytes read + bytes written)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, repeats=20)
    return 2 * num_bytes / ms / 1e6


def matmul_tflops(n=8192, dtype=torch.bfloat16):
    """Measured dense matmul rate in TFLOP/s (the MFU denominator)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = time_ms(lambda: a @ b, warmup=5, repeats=20)
    return 2 * n ** 3 / ms / 1e9


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def write_results(name, rows, extra=None):
    """Write rows (list of flat dicts) to results/<name>-<device>-<date>.json and .csv; return paths."""
    env = environment()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{env['device'].replace(' ', '_')}-{env['date'][:10]}"
    json_path, csv_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.csv"
    json_path.write_text(json.dumps({"environment": env, **(extra or {}), "rows": rows}, indent=1))
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def print_table(rows, keys=None):
    keys = keys or list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).rjust(w) for k, w in zip(keys, widths)))
