"""Compile every Triton kernel of mcr_kernels for sm_80 and sm_90 without a GPU, and every
CUDA kernel of the built extension, and say whether each launch configuration fits.

    python -m mcr_kernels.compile_check                 # full table; exit 1 on any failure
    python -m mcr_kernels.compile_check --subset        # CI: bf16, largest config per kernel
    python -m mcr_kernels.compile_check --write benchmarks/results   # + compile_check-<date>.md/.json

A kernel module of mcr_kernels.triton declares what its launchers pass in `COMPILE_SPECS`, a
list of dicts, next to the kernels (the check finds them; nothing to register here):

    kernel      the @triton.jit function or the @triton.autotune wrapper around it
    dtypes      element types "{dtype}" stands for, e.g. ("fp16", "bf16", "fp32")
    signature   argument -> type for what is not an i32 scalar: "*{dtype}", "*i64", "fp32"
    divisible   i32 arguments that are multiples of 16 at the benchmark shapes (as Triton's
                specialization sees them; pointers are always 16-byte aligned)
    variants    list of dicts, or dtype -> list: constexpr values (and integer arguments the
                launcher passes as 1, which Triton turns into constants); optional keys
                "signature" (overrides), "num_warps" / "num_stages" (kernels without autotune),
                "archs" (the archs the launcher uses this variant on; default both)

Every autotune config that the kernel's early_config_prune keeps for a variant is compiled
with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)); ptxas -v on the PTX
gives registers and spills, Triton's metadata the shared memory. A config fits when shared
memory <= the per-block opt-in limit (sm_80 163 KiB, sm_90 227 KiB), registers <= 255 and
one block's registers fit the SM's 64 Ki. The CUDA kernels' resources come from
`cuobjdump --dump-resource-usage` on mcr_kernels/_C*.so (which must hold sm_80 and sm_90).
"""
import argparse
import collections
import contextlib
import dataclasses
import datetime
import glob
import importlib
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ARCHS = (80, 90)
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}   # opt-in maximum per block
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
CUDA_THREADS_PER_BLOCK = 256                          # csrc/patch_drop_cuda.cu: threads_for() <= 256


@dataclasses.dataclass
class Row:
    """One compiled kernel x config x dtype x arch and its resources."""
    kernel: str
    module: str
    arch: int
    dtype: str
    variant: str
    config: str
    num_warps: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    local: int = 0          # CUDA kernels: local memory per thread from cuobjdump (spills and local arrays)
    shared: int = 0
    blocks_per_sm: int = 0
    fits: bool = False
    error: str = ""
    seconds: float = 0.0


# --- resources and limits ---------------------------------------------------------------

def parse_ptxas(log):
    """{registers, spill_stores, spill_loads, stack, static_shared} from `ptxas -v` output
    (one entry function)."""
    used = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if used is None or frame is None:
        raise ValueError(f"no resource line in ptxas output:\n{log}")
    return dict(registers=int(used.group(1)), static_shared=int(used.group(2) or 0),
                stack=int(frame.group(1)), spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))


def parse_cuobjdump(text):
    """[(arch, function, {REG, STACK, SHARED, LOCAL})] from `cuobjdump --dump-resource-usage`."""
    out, arch = [], None
    function = None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and (fields := dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))):
            out.append((arch, function, {k: int(v) for k, v in fields.items()}))
            function = None
    return out


def blocks_per_sm(arch, num_warps, registers, shared):
    """Resident blocks per SM (0: cannot launch): registers are allocated per warp in units of
    256 (8 per thread), shared memory per block up to the opt-in limit."""
    threads = 32 * num_warps
    if registers > MAX_REGISTERS_PER_THREAD or shared > SHARED_PER_BLOCK[arch] or threads > 1024:
        return 0
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps
    by_shared = SHARED_PER_SM[arch] // shared if shared else MAX_BLOCKS_PER_SM
    return min(by_registers, by_shared, MAX_THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM)


# --- Triton kernels -----------------------------------------------------------------------

def discover_specs():
    """(module name, spec) for every COMPILE_SPECS entry of the mcr_kernels.triton modules."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check compiles for real GPUs: unset TRITON_INTERPRET")
    import mcr_kernels.triton as package
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found += [(info.name, spec) for spec in getattr(module, "COMPILE_SPECS", [])]
    return found


def _unwrap(kernel):
    """(jit function, autotune configs or None, early prune or None)."""
    if hasattr(kernel, "configs") and hasattr(kernel, "fn"):
        return kernel.fn, list(kernel.configs), getattr(kernel, "early_config_prune", None)
    return kernel, None, None


def _label(values):
    return " ".join(f"{k}={v}" for k, v in values.items())


def expand(module, spec, *, subset=False, archs=ARCHS, dtypes=None):
    """Compile jobs of one spec: dicts with everything triton.compile needs and the row labels."""
    fn, configs, prune = _unwrap(spec["kernel"])
    jobs = []
    for dtype in spec.get("dtypes", ("fp32",)):
        if dtypes and dtype not in dtypes:
            continue
        variants = spec.get("variants", [{}])
        variants = variants(dtype) if callable(variants) else variants
        for index, variant in enumerate(variants[:1] if subset else variants):
            variant = dict(variant)
            overrides = variant.pop("signature", {})
            options = {k: variant.pop(k) for k in ("num_warps", "num_stages") if k in variant}
            launched_on = variant.pop("archs", archs)
            variant_archs = [arch for arch in archs if arch in launched_on]
            signature = {**spec.get("signature", {}), **overrides}
            for arch in variant_archs:
                if configs is None:
                    launches = [({"num_warps": 4, "num_stages": 3, **options}, {})]
                else:  # the prune sees the arch's shared memory limit, as it sees the device's at launch
                    stand_ins = {**_stand_ins(signature, dtype, variant), "SHARED_LIMIT": SHARED_PER_BLOCK[arch]}
                    kept = prune(configs, stand_ins, **variant) if prune else configs
                    launches = [(dict(num_warps=c.num_warps, num_stages=c.num_stages), dict(c.kwargs)) for c in kept]
                    if subset and launches:  # the largest tile: most likely to spill or run out of shared memory
                        launches = [max(launches, key=lambda lc: (math.prod(lc[1].values()), lc[0]["num_stages"]))]
                for opts, block in launches:
                    jobs.append(dict(fn=fn, module=module, arch=arch, dtype=dtype, options=opts,
                                     constexprs={**variant, **block}, block=block, signature=signature,
                                     divisible=spec.get("divisible", ()), variant=_label(variant),
                                     variant_index=index, only_dtype=len(spec.get("dtypes", ())) <= 1))
    return jobs


_TORCH_DTYPES = dict(fp16="float16", bf16="bfloat16", fp32="float32", fp64="float64", i64="int64", i32="int32",
                     u8="uint8")


def _stand_ins(signature, dtype, variant):
    """The named arguments an early_config_prune sees at launch: empty tensors of each pointer's
    dtype, and the variant's constexprs."""
    import torch
    tensors = {name: torch.empty(0, dtype=getattr(torch, _TORCH_DTYPES[kind[1:].format(dtype=dtype)]))
               for name, kind in signature.items() if kind.startswith("*")}
    return {**tensors, **variant}


def _ast_source(job):
    from triton.compiler import ASTSource
    fn, constexprs = job["fn"], job["constexprs"]
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind = job["signature"].get(name, "i32").format(dtype=job["dtype"])
        signature[name] = kind
        if kind.startswith("*") or name in job["divisible"]:
            attrs[(index,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing} in its COMPILE_SPECS variant")
    return ASTSource(fn, signature, constexprs, attrs)


def _config_label(job):
    return _label({**job["block"], "warps": job["options"]["num_warps"], "stages": job["options"]["num_stages"]})


def _ptxas(arch):
    """The ptxas that Triton itself runs for this arch (falls back to the one on PATH)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        return shutil.which("ptxas")


def _gpu_name(arch):
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


_LOG_DIR = pathlib.Path(os.environ.get("TRITON_CACHE_DIR", pathlib.Path.home() / ".triton" / "cache"),
                        "mcr_compile_check")  # ptxas logs by kernel hash, beside Triton's cache


def _compile_logged(src, target, options):
    """triton.compile with the `ptxas -v` log of that very compile (printed by Triton when its
    dump_ptxas_log knob is on; empty for a cached kernel or a Triton without the knob)."""
    import triton
    try:
        from triton import knobs
        nvidia = knobs.nvidia
    except ImportError:
        return triton.compile(src, target=target, options=options), ""
    previous, nvidia.dump_ptxas_log = nvidia.dump_ptxas_log, True
    try:
        with contextlib.redirect_stdout(io.StringIO()) as log:
            compiled = triton.compile(src, target=target, options=options)
    finally:
        nvidia.dump_ptxas_log = previous
    return compiled, log.getvalue()


def compile_job(job):
    """Compile one job; the Row with resources and fit, or with the error."""
    from triton.backends.compiler import GPUTarget
    fn = job["fn"]
    row = Row(kernel=fn.__name__, module=job["module"], arch=job["arch"], dtype=job["dtype"],
              variant=job["variant"], config=_config_label(job),
              num_warps=job["options"]["num_warps"])
    start = time.perf_counter()
    try:
        compiled, log = _compile_logged(_ast_source(job), GPUTarget("cuda", job["arch"], 32), job["options"])
        saved = _LOG_DIR / f"{compiled.hash}.log"
        if "Used" not in log and saved.exists():  # Triton's cache answered: the log from last time
            log = saved.read_text()
        elif "Used" not in log:  # cached by a run before this one kept logs: run ptxas here
            with tempfile.TemporaryDirectory() as tmp:
                ptx = pathlib.Path(tmp, "kernel.ptx")
                ptx.write_text(compiled.asm["ptx"])
                log = subprocess.run([_ptxas(job["arch"]), "-v", f"--gpu-name={_gpu_name(job['arch'])}", str(ptx),
                                      "-o", str(ptx.with_suffix(".cubin"))], capture_output=True, text=True,
                                     check=True).stderr
        if not saved.exists():
            _LOG_DIR.mkdir(parents=True, exist_ok=True)
            saved.write_text(log)
        res = parse_ptxas(log)
        row.registers, row.spill_stores, row.spill_loads, row.stack = (
            res["registers"], res["spill_stores"], res["spill_loads"], res["stack"])
        row.shared = compiled.metadata.shared + res["static_shared"]
        row.num_warps = compiled.metadata.num_warps
        row.blocks_per_sm = blocks_per_sm(row.arch, row.num_warps, row.registers, row.shared)
        row.fits = row.blocks_per_sm > 0
    except Exception as error:  # noqa: BLE001 (every failure becomes a failing row)
        row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200] if str(error).strip() else ''}"
    row.seconds = round(time.perf_counter() - start, 2)
    return row


# --- CUDA kernels of the extension ---------------------------------------------------------

def _cuobjdump():
    try:
        from triton.backends.nvidia.compiler import knobs
        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except (ImportError, AttributeError):
        pass
    return shutil.which("cuobjdump")


def _demangle(name):
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def cuda_rows(archs=ARCHS):
    """Rows of the CUDA kernels compiled into mcr_kernels/_C*.so, and a note (or None) when there
    are none: a CPU-only build, or no cuobjdump."""
    libs = glob.glob(str(pathlib.Path(__file__).parent / "_C*.so"))
    tool = _cuobjdump()
    if not libs or tool is None:
        return [], "CUDA kernels not checked: " + ("no mcr_kernels/_C*.so" if not libs else "no cuobjdump")
    text = subprocess.run([tool, "--dump-resource-usage", libs[0]], capture_output=True, text=True).stdout
    found = parse_cuobjdump(text)
    if not found:
        return [], f"CUDA kernels not checked: {pathlib.Path(libs[0]).name} holds no cubin (CPU-only build)"
    rows = []
    for arch, name, res in found:
        pretty = _demangle(name)
        kernel = re.sub(r"^.*::|\(.*$", "", pretty.split("<")[0])
        template = re.search(r"<([^>]*)>", pretty)
        warps = CUDA_THREADS_PER_BLOCK // 32
        shared = res.get("SHARED", 0)
        row = Row(kernel=kernel, module="csrc", arch=arch, dtype=template.group(1).replace("c10::", "") if template
                  else "", variant="", config=f"threads<={CUDA_THREADS_PER_BLOCK}", num_warps=warps,
                  registers=res.get("REG", 0), stack=res.get("STACK", 0), local=res.get("LOCAL", 0), shared=shared)
        row.blocks_per_sm = blocks_per_sm(arch, warps, row.registers, shared)
        row.fits = row.blocks_per_sm > 0
        rows.append(row)
    for arch in archs:
        if not any(r.arch == arch for r in rows):
            rows.append(Row(kernel="(all CUDA kernels)", module="csrc", arch=arch, dtype="", variant="", config="",
                            num_warps=0, error=f"{pathlib.Path(libs[0]).name} has no sm_{arch} code"))
    return rows, None


# --- report -------------------------------------------------------------------------------

def environment():
    import torch
    import triton
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                triton=triton.__version__, torch=torch.__version__, cuda=torch.version.cuda,
                ptxas=subprocess.run([_ptxas(90), "--version"], capture_output=True, text=True).stdout.strip()
                .splitlines()[-1], python=sys.version.split()[0])


def summary(rows, planned):
    """Markdown lines: per kernel, configurations compiled of planned, failing, with spills, and the
    largest registers / shared memory seen."""
    lines = ["| module | kernel | compiled / planned | failing | with spills | max regs | max shared |",
             "|---|---|---|---|---|---|---|"]
    for (module, kernel), count in planned.items():
        done = [r for r in rows if (r.module, r.kernel) == (module, kernel)]
        bad = sum(1 for r in done if r.error or not r.fits)
        spills = sum(1 for r in done if r.spill_stores or r.spill_loads or r.local)
        lines.append(f"| {module} | {kernel} | {len(done)} / {count} | {bad} | {spills} | "
                     f"{max((r.registers for r in done), default='')} | {max((r.shared for r in done), default='')} |")
    return lines


def markdown(rows, env, note, planned):
    lines = [f"# Compile check {env['date'][:10]}", "",
             f"triton {env['triton']}, torch {env['torch']} (CUDA {env['cuda']}), ptxas `{env['ptxas']}`; "
             "no GPU: compiled for the targets, nothing launched. `python -m mcr_kernels.compile_check` "
             "regenerates it.", "",
             "Limits: shared memory per block 163 KiB (sm_80) / 227 KiB (sm_90), 255 registers per thread, "
             "one block's registers within 64 Ki per SM. spill/stack in bytes per thread (CUDA rows: "
             "LOCAL for spills); shared in bytes per block; blocks/SM = resident blocks.", ""]
    if note:
        lines += [f"{note}.", ""]
    failures = [r for r in rows if r.error or not r.fits]
    spills = [r for r in rows if r.spill_stores or r.spill_loads or r.local]
    lines += [f"{len(rows)} compiled configurations, {len(failures)} failing, {len(spills)} with spills.", ""]
    lines += summary(rows, planned) + [""]
    head = ["module", "kernel", "arch", "dtype", "variant", "config", "regs", "spill st/ld", "stack", "shared",
            "blocks/SM", "fits"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fits = "yes" if r.fits else f"**NO** {r.error}".strip()
        spill = f"local {r.local}" if r.module == "csrc" else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(f"| {r.module} | {r.kernel} | sm_{r.arch} | {r.dtype} | {r.variant} | {r.config} | "
                     f"{r.registers} | {spill} | {r.stack} | {r.shared} | {r.blocks_per_sm} | {fits} |")
    return "\n".join(lines) + "\n"


def build_jobs(subset=False, archs=ARCHS, kernels=None, dtypes=None):
    """Every compile job of every discovered spec, filtered; the same list in every process."""
    jobs = []
    for module, spec in discover_specs():
        spec_dtypes = spec.get("dtypes", ("fp32",))
        chosen = dtypes or (("bf16",) if subset and "bf16" in spec_dtypes else None)
        for job in expand(module, spec, subset=subset, archs=archs, dtypes=chosen):
            if subset and chosen is None and job["dtype"] != spec_dtypes[0]:
                continue
            if not kernels or job["fn"].__name__ in kernels:
                jobs.append(job)
    # every kernel's first variant (its most demanding head dim / mode) before the others, bf16
    # (or a kernel's only dtype) first: an interrupted run has covered every kernel x config x
    # arch once, then every dtype
    rank = {"bf16": 0, "fp32": 1, "fp16": 2}
    return sorted(jobs, key=lambda job: (job["variant_index"], 0 if job["only_dtype"] else rank.get(job["dtype"], 0)))


def _compile_to_pipe(job, writer):
    os.setpgrp()  # its own process group: a Ctrl-C reaches the parent alone, and a kill reaches ptxas too
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    writer.send(compile_job(job))
    writer.close()


def _compile_in_workers(jobs, processes, stop):
    """Yield compile_job(job) for every job, in completion order, each compiled in a forked
    process (forked, so the jobs' JIT functions need not pickle), at most `processes` at a
    time, until `stop` is non-empty; closing the generator (an interrupt) kills the running
    ones and their children."""
    fork = multiprocessing.get_context("fork")
    waiting = iter(jobs)
    running = {}  # result pipe -> (process, job)
    try:
        while True:
            while len(running) < processes and (job := next(waiting, None)) is not None:
                reader, writer = fork.Pipe(duplex=False)
                process = fork.Process(target=_compile_to_pipe, args=(job, writer), daemon=True)
                # an interrupt inside fork() would be swallowed by its at-fork hooks (logging's):
                # hold it back until the fork is done, when it raises here
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    process.start()
                    writer.close()
                    running[reader] = (process, job)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            if not running or stop:
                return
            for reader in multiprocessing.connection.wait(list(running), timeout=0.1):
                process, job = running.pop(reader)
                try:
                    row = reader.recv()
                except EOFError:
                    process.join()
                    raise RuntimeError(f"the compile of {job['module']}.{job['fn'].__name__} sm_{job['arch']} "
                                       f"{job['dtype']} died (exit code {process.exitcode})") from None
                process.join()
                yield row
    finally:
        for process, _ in running.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
            process.join()


def run(jobs, processes=1, progress=True, rows=None):
    """Compile all jobs, appending each Row to `rows` as it completes; an interrupt (Ctrl-C,
    timeout -s INT) stops early and keeps them (with --jobs N the running compiles are killed,
    not waited for)."""
    rows = [] if rows is None else rows
    # SIGINT sets `stop` besides raising: a KeyboardInterrupt raised inside an at-fork hook or a
    # finalizer is dropped by Python (the signal can reach another thread while the main thread
    # blocks it around fork), and the run went on to the end
    stop = []

    def interrupt(signum, frame):
        stop.append(signum)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    catch = previous not in (signal.SIG_IGN, None)  # a shell's background job ignores Ctrl-C: so does the run
    if catch:
        signal.signal(signal.SIGINT, interrupt)
    results = (compile_job(job) for job in jobs) if processes <= 1 else _compile_in_workers(jobs, processes, stop)
    try:
        for row in results:
            rows.append(row)
            if progress:
                _print_row(row, len(rows), len(jobs))
            if stop:
                break
    except KeyboardInterrupt:
        stop.append(signal.SIGINT)
    finally:
        results.close()
        if catch:
            signal.signal(signal.SIGINT, previous)
    if stop:
        print(f"interrupted after {len(rows)} of {len(jobs)} configurations", flush=True)
    return rows


def _print_row(r, i, n):
    status = "ok" if r.fits else f"FAIL {r.error}"
    print(f"[{i}/{n}] {r.module}.{r.kernel} sm_{r.arch} {r.dtype} {r.variant} | {r.config}: regs {r.registers} "
          f"spill {r.spill_stores}/{r.spill_loads} shared {r.shared} blocks/SM {r.blocks_per_sm} {status} "
          f"({r.seconds}s)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", action="store_true",
                        help="CI subset: bf16 (else the first dtype), first variant, largest config, both archs")
    parser.add_argument("--kernel", action="append", help="only kernels with this name (repeatable)")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this arch (repeatable)")
    parser.add_argument("--dtype", action="append", help="only this dtype, e.g. bf16 (repeatable)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of mcr_kernels/_C*.so")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--list", action="store_true",
                        help="list the configurations (and check every spec builds a source) without compiling")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH ('-' = stdout, no table)")
    parser.add_argument("--write", metavar="DIR", help="write DIR/compile_check-<date>.md and .json")
    args = parser.parse_args(argv)
    selection = (args.subset, tuple(args.arch or ARCHS), tuple(args.kernel or ()), tuple(args.dtype or ()))
    jobs = build_jobs(*selection)
    if args.list:
        for job in jobs:
            _ast_source(job)
            print(f"{job['module']}.{job['fn'].__name__} sm_{job['arch']} {job['dtype']} {job['variant']} | "
                  f"{_config_label(job)}")
        print(f"{len(jobs)} configurations")
        return 0
    quiet = args.json == "-"
    start = time.perf_counter()
    rows = run(jobs, args.jobs, progress=not quiet)
    coverage = f"{len(rows)} of {len(jobs)} Triton configurations compiled"
    complete = len(rows) == len(jobs)
    note = None if complete else f"INCOMPLETE: interrupted, {coverage}"
    if not args.no_cuda and not args.kernel:
        cuda, cuda_note = cuda_rows(selection[1])
        rows += cuda
        note = "; ".join(n for n in (note, cuda_note) if n) or None
    env = environment()
    failures = [r for r in rows if r.error or not r.fits]
    report = json.dumps({"environment": env, "note": note, "coverage": coverage,
                         "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)
    if args.json:
        sys.stdout.write(report + "\n") if quiet else pathlib.Path(args.json).write_text(report)
    if args.write:
        out = pathlib.Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"compile_check-{env['date'][:10]}"
        planned = collections.Counter((job["module"], job["fn"].__name__) for job in jobs)
        planned.update((r.module, r.kernel) for r in rows if r.module == "csrc")
        stem.with_suffix(".md").write_text(markdown(rows, env, note, planned))
        stem.with_suffix(".json").write_text(report)
        if not quiet:
            print("wrote", stem.with_suffix(".md"), stem.with_suffix(".json"))
    if not quiet:
        spills = [r for r in rows if r.spill_stores or r.spill_loads or r.local]
        print(f"{len(rows)} configurations in {time.perf_counter() - start:.0f} s: {len(failures)} failing, "
              f"{len(spills)} with spills" + (f"; {note}" if note else ""))
        for r in spills:
            print(f"  spills: {r.module}.{r.kernel} sm_{r.arch} {r.dtype} {r.variant} | {r.config}: "
                  f"{r.spill_stores}/{r.spill_loads} bytes" + (f" (local {r.local})" if r.local else ""))
        for r in failures:
            print(f"  FAIL: {r.module}.{r.kernel} sm_{r.arch} {r.dtype} {r.variant} | {r.config}: "
                  f"{r.error or 'does not fit'} (regs {r.registers}, shared {r.shared})")
    return 1 if failures or complete is False else 0


if __name__ == "__main__":
    sys.exit(main())
