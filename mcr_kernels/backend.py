"""Which implementation runs each op: `reference`, `triton`, `native` or `cpu`.

Default: the fastest one available for the tensors' device — on CUDA `triton`, then
`native`, then `cpu`, then `reference`; on CPU `native`, then `cpu` (torch's fused CPU kernels
in blocks, mcr_kernels/cpu), then `reference` (Triton kernels run on CPU
tensors only when forced, under TRITON_INTERPRET=1, which is how the tests use them).

Force a backend for all ops or some:
    mcr_kernels.set_backend("reference")                     # every op that has one
    mcr_kernels.set_backend("triton", "gather_tokens")        # one op (must exist)
    with mcr_kernels.use_backend("reference"): ...
or, read at import, the environment variable
    MCR_KERNELS_BACKEND=reference            or   MCR_KERNELS_BACKEND=gather_tokens=native,mba_pool=reference
A backend forced for all ops applies to the ops that have it; the others keep the default.
"""
import contextlib
import os

BACKENDS = ("reference", "triton", "native", "cpu")
_PREFERENCE = {"cuda": ("triton", "native", "cpu", "reference"), "cpu": ("native", "cpu", "reference")}
_ALL = "*"

_registry = {}  # op -> {backend: (fn, available(device) -> bool)}
_forced = {}    # op or _ALL -> backend


def register(op, backend, fn, available=lambda device: True):
    """Make fn the `backend` implementation of `op`, usable where available(device)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _registry.setdefault(op, {})[backend] = (fn, available)


def ops():
    """Names of the registered ops."""
    return tuple(sorted(_registry))


def available_backends(op, device):
    """Backends of `op` that can run on `device` (a torch.device), in preference order."""
    impls = _registry[op]
    return tuple(b for b in BACKENDS if b in impls and impls[b][1](device))


def _check_op(op):
    if op not in _registry:
        raise ValueError(f"unknown op {op!r}; ops are {ops()}")


def set_backend(backend, *op_names):
    """Force `backend` for the named ops (all ops if none named); None restores the default."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for op in op_names:
        _check_op(op)
        if backend is not None and backend not in _registry[op]:
            raise ValueError(f"op {op!r} has no {backend!r} backend; it has {tuple(_registry[op])}")
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
    set_backend(backend, *op_names)
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
        fn, available = impls[forced]
        if not available(device):
            raise RuntimeError(f"{op}: backend {forced!r} is forced but cannot run on {device} "
                               f"(available there: {available_backends(op, device)})")
        return forced, fn
    for backend in _PREFERENCE.get(device.type, ("reference",)):
        if backend in impls and impls[backend][1](device):
            return backend, impls[backend][0]
    return "reference", impls["reference"][0]


def _load_environment():
    spec = os.environ.get("MCR_KERNELS_BACKEND", "").strip()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        op, _, backend = item.rpartition("=")
        if backend not in BACKENDS:
            raise ValueError(f"MCR_KERNELS_BACKEND: backend must be one of {BACKENDS}, got {backend!r}")
        _forced[op or _ALL] = backend


def triton_available(device):
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return _has_triton()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _has_triton()


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_load_environment()


def on_cpu(device):
    """The `cpu` backends run where they are tested: CPU tensors."""
    return device.type == "cpu"
