"""Shared machinery of the apply_* functions: bind a forward on a module instance (and
undo it), warn once per model when attention dropout sends a call to torch's SDPA,
recognise a causal mask by its values and a GELU module by what it computes."""
import functools
import warnings
import weakref

import torch
import torch.nn.functional as F

PATCHED_FORWARDS = set()  # the functions apply_* bind as `forward`; revert() removes them
PATCHED_METHODS = ("forward", "feed_forward_chunk")  # the method names they are bound as


def patched_forward(fn):
    """Decorator: mark fn as a forward that apply_* functions bind on module instances."""
    PATCHED_FORWARDS.add(fn)
    return fn


def is_patched(module, name="forward"):
    method = module.__dict__.get(name)
    return isinstance(method, functools.partial) and method.func in PATCHED_FORWARDS


class ModelToken:
    """Shared by the modules one apply_* call patched: 'once per model' warnings key on it."""


def patch_forward(module, fn, token, name="forward"):
    """Bind fn as module.<name> (an instance attribute, a partial so that the model still
    pickles and deep-copies; the class is untouched). False when already patched, or when
    something else (e.g. an accelerate hook) replaced it."""
    if name in module.__dict__:
        return False
    setattr(module, name, functools.partial(fn, module))
    module._mcr_kernels_token = token
    return True


def unpatch_forward(module):
    """Undo patch_forward (every method name); True when module was patched."""
    names = [name for name in PATCHED_METHODS if is_patched(module, name)]
    for name in names:
        delattr(module, name)
    if names:
        module.__dict__.pop("_mcr_kernels_token", None)
    return bool(names)


def gelu_approximation(act):
    """F.gelu's `approximate` ("none" or "tanh") when the module `act` computes exactly
    F.gelu: torch's nn.GELU, timm's GELU / GELUTanh, transformers' GELUActivation /
    GELUTanh / PytorchGELUTanh; None for anything else (python GELUs, QuickGELU, ...)."""
    cls = type(act)
    if cls is torch.nn.GELU:
        return act.approximate
    if cls.__module__ == "timm.layers.activations" and cls.__name__ in ("GELU", "GELUTanh"):
        return "none" if cls.__name__ == "GELU" else "tanh"
    if cls.__module__ == "transformers.activations":
        fn = getattr(act, "act", None)
        if cls.__name__ == "GELUActivation" and fn is F.gelu:
            return "none"
        if cls.__name__ in ("GELUTanh", "PytorchGELUTanh") and isinstance(fn, functools.partial) \
                and fn.func is F.gelu and not fn.args and fn.keywords == {"approximate": "tanh"}:
            return "tanh"
    return None


def plain_layer_norm(norm):
    """torch's nn.LayerNorm, or timm's LayerNorm without its fast-norm path, over the last
    dim only: the norm that layer_norm_linear and gelu_mlp's pre-norm form compute."""
    cls = type(norm)
    timm_layer_norm = cls.__module__ == "timm.layers.norm" and cls.__name__ == "LayerNorm"
    return ((cls is torch.nn.LayerNorm or timm_layer_norm) and len(norm.normalized_shape) == 1
            and not getattr(norm, "_fast_norm", False))


_dropout_warned = weakref.WeakValueDictionary()  # id(owner) -> owner


def warn_dropout_once(owner, where):
    """Warn the first time `owner` (a model's token or HF config) needs SDPA for dropout."""
    if _dropout_warned.get(id(owner)) is owner:
        return
    _dropout_warned[id(owner)] = owner
    warnings.warn(f"{where}: attention dropout > 0 in training, so these calls run torch's "
                  "scaled_dot_product_attention (mcr_kernels' attention kernels have no dropout); "
                  "set the attention dropout to 0 to use the kernels", stacklevel=3)


_causal_checks = {}  # id(mask) -> (weakref to mask, mask._version, is causal)


def is_causal_mask(mask, *, bool_true_means_masked):
    """True when mask [L, L] forbids exactly the keys after each query: a float mask with
    -inf above the diagonal and 0 elsewhere, or the bool equivalent. The answer is cached
    per tensor object and version, so a model's causal buffer is read once."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    try:
        key, version = id(mask), mask._version
    except RuntimeError:  # inference tensors have no version counter: check every call
        key = version = None
    hit = _causal_checks.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == version:
        return hit[2]
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    if mask.dtype == torch.bool:
        result = bool(torch.equal(mask, above if bool_true_means_masked else ~above))
    else:
        result = bool((mask[above] == float("-inf")).all() and (mask[~above] == 0).all())
    if key is not None:
        _causal_checks[key] = (weakref.ref(mask, lambda _, key=key: _causal_checks.pop(key, None)),
                               version, result)
    return result
