"""Which implementation runs each op: `reference`, `triton`, `native` or `blockwise`.

Default: the fastest one available for the tensors' device — on CUDA `triton`, then
`native`, then `blockwise`, then `reference`; on CPU `native`, then `blockwise` (torch's
fused CPU kernels in blocks, mcr_kernels/blockwise), then `reference` (Triton kernels run on
CPU tensors only when forced, under TRITON_INTERPRET=1, which is how the tests use them).
The backend name "cpu" (the old name of `blockwise`) is still accepted, with a
DeprecationWarning, by set_backend, use_backend and MCR_KERNELS_BACKEND.

Force a backend for all ops or some:
    mcr_kernels.set_backend("reference")                     # every op that has one
    mcr_kernels.set_backend("triton", "gather_tokens")        # one op (must exist)
    with mcr_kernels.use_backend("reference"): ...
or, read at import, the environment variable
    MCR_KERNELS_BACKEND=reference            or   MCR_KERNELS_BACKEND=gather_tokens=native,mba_pool=reference
A backend forced for all ops applies to the ops that have it; the others keep the default.

An op file registers its backends with `register` (the only way), e.g.
    backend.register("my_op", "reference", reference.my_op)
    backend.register("my_op", "native", _my_op_native, devices=("cpu",))
    if backend.HAS_TRITON:  # a broken kernel file raises here: never a silent fallback
        from mcr_kernels.triton import my_op as triton_my_op
        backend.register("my_op", "triton", triton_my_op.my_op)
Where a backend can run follows from its name (`runs_on`), optionally narrowed by `devices`
(the `blockwise` backends of attention and MbA register with devices=("cpu",): where they are tested).

The tree: the public front ends (mcr_kernels/<op>.py) check arguments and register backends;
each backend lives in its folder (triton/, blockwise/, native/) or in reference.py and imports
neither another backend nor a front end; what two backends share is a private module
(mcr_kernels/_<name>.py).

Precision, one rule for every op and backend: float32 inputs get float32 products unless
torch allows TF32 for float32 matmuls (`torch.backends.cuda.matmul.allow_tf32 = True` or
`torch.set_float32_matmul_precision("high")`), as torch's own matmul; float16/bfloat16
inputs multiply in their dtype and accumulate in float32; float64 computes in float64.
"""
import contextlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "native", "blockwise")
_RENAMED = {"cpu": "blockwise"}  # old name -> name, accepted with a DeprecationWarning for one release
_PREFERENCE = {"cuda": ("triton", "native", "blockwise", "reference"), "cpu": ("native", "blockwise", "reference")}
_ALL = "*"
HAS_TRITON = importlib.util.find_spec("triton") is not None

_registry = {}  # op -> {backend: (fn, device types or None for all)}
_forced = {}    # op or _ALL -> backend


def runs_on(backend, device):
    """Whether `backend` kernels can run on `device` at all: reference everywhere; triton on
    CUDA (triton installed) and on CPU under TRITON_INTERPRET=1; native where mcr_kernels._C
    was built for the device."""
    if backend in ("reference", "blockwise"):  # plain torch code
        return True
    if backend == "triton":
        interpret = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        return HAS_TRITON and (device.type == "cuda" or interpret)
    from mcr_kernels.native import native_available

    return native_available(device)


def register(op, backend, fn, *, devices=None):
    """Make fn the `backend` implementation of `op`; `devices` (e.g. ("cpu",)) narrows
    where it runs below what runs_on(backend) allows."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = (fn, None if devices is None else tuple(devices))


@contextlib.contextmanager
def wrapped(op, backend, wrapper):
    """Within the block, `op`'s `backend` implementation fn runs as wrapper(fn) (e.g. a call
    counter in tests); the registration is restored on exit."""
    _check_op(op)
    if backend not in _registry[op]:
        raise ValueError(f"op {op!r} has no {backend!r} backend; it has {registered_backends(op)}")
    fn, devices = _registry[op][backend]
    _registry[op][backend] = (wrapper(fn), devices)
    try:
        yield
    finally:
        _registry[op][backend] = (fn, devices)


def ops():
    """Names of the registered ops."""
    return tuple(sorted(_registry))


def registered_backends(op):
    """Backends registered for `op`, on any device, in BACKENDS order."""
    _check_op(op)
    return tuple(b for b in BACKENDS if b in _registry[op])


def _can_run(op, backend, device):
    devices = _registry[op][backend][1]
    return (devices is None or device.type in devices) and runs_on(backend, device)


def available_backends(op, device):
    """Backends of `op` that can run on `device` (torch.device or a string such as "cpu")."""
    device = torch.device(device)
    return tuple(b for b in registered_backends(op) if _can_run(op, b, device))


def _check_op(op):
    if op not in _registry:
        raise ValueError(f"unknown op {op!r}; ops are {ops()}")


def _current_name(backend, source):
    """backend under its current name; an old name gives a DeprecationWarning naming `source`."""
    if backend in _RENAMED:
        warnings.warn(f"{source}: backend {backend!r} is now called {_RENAMED[backend]!r}; the old name goes "
                      "in the next release", DeprecationWarning, stacklevel=3)
        return _RENAMED[backend]
    return backend


def set_backend(backend, *op_names):
    """Force `backend` for the named ops (all ops if none named); None restores the default."""
    backend = _current_name(backend, "set_backend")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for op in op_names:
        _check_op(op)
        if backend is not None and backend not in _registry[op]:
            raise ValueError(f"op {op!r} has no {backend!r} backend; it has {registered_backends(op)}")
    for key in op_names or (_ALL,):
        if backend is None:
            _forced.pop(key, None)
        else:
            _forced[key] = backend
    if not op_names and backend is None:
        _forced.clear()


def get_backend(op=None):
    """The backend forced for `op` (or for all ops), or None for the default choice."""
    return _forced.get(op) or _forced.get(_ALL)


@contextlib.contextmanager
def use_backend(backend, *op_names):
    """Context manager form of set_backend; restores the previous choice on exit."""
    saved = dict(_forced)
    set_backend(_current_name(backend, "use_backend"), *op_names)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def resolve(op, device):
    """(backend name, function) that runs `op` on `device` now."""
    impls = _registry[op]
    forced = _forced.get(op) or (_forced.get(_ALL) if _forced.get(_ALL) in impls else None)
    if forced is not None:
        if not _can_run(op, forced, device):
            raise RuntimeError(f"{op}: backend {forced!r} is forced but cannot run on {device} "
                               f"(available there: {available_backends(op, device)})")
        return forced, impls[forced][0]
    for backend in _PREFERENCE.get(device.type, ("reference",)):
        if backend in impls and _can_run(op, backend, device):
            return backend, impls[backend][0]
    return "reference", impls["reference"][0]


def dot_precision(dtype):
    """Triton tl.dot input_precision under the precision rule above: "ieee" for float32
    inputs unless torch allows TF32 for float32 matmuls; 16-bit inputs are exact in either
    ("tf32", the setting their compiled variants use)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def shared_memory_per_block(device):
    """The most shared memory (bytes) one Triton program may use on a CUDA device (the opt-in
    limit: 163 KiB on an A100, 227 KiB on an H100); the kernels' tile choices check it."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _load_environment():
    spec = os.environ.get("MCR_KERNELS_BACKEND", "").strip()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        op, _, backend = item.rpartition("=")
        backend = _current_name(backend, "MCR_KERNELS_BACKEND")
        if backend not in BACKENDS:
            raise ValueError(f"MCR_KERNELS_BACKEND: backend must be one of {BACKENDS}, got {backend!r}")
        _forced[op or _ALL] = backend


_load_environment()

