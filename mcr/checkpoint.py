"""Checkpoints: safetensors weights + optimizer, a JSON training state, written atomically.

Layout under <out_dir>/checkpoints/: one folder per step (step_00000400/ holding
model.safetensors (full weights by parameter name), optimizer.safetensors (AdamW state by
parameter name, and the RNG), state.json) and a file `latest` naming the newest
complete one. A folder is written under a temporary name and renamed when complete, and
`latest` is replaced atomically after it: a crash or kill never leaves a half checkpoint
that resume would pick, and never touches the previous checkpoints. The tensors are
full, never shards, so a run resumes on any number of processes, with or without FSDP.
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def full_state_dicts(model, optimizer=None):
    """(model, optimizer) state as full, unsharded CPU tensors, the same for one process,
    DDP and FSDP: parameters by name, optimizer state by parameter name (torch's
    distributed-checkpoint layout). A collective under FSDP (every rank calls it; rank 0
    receives the tensors, the others empty dicts)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
    return model_state, optimizer_state


def _tied_names(model):
    """{alias: name} for parameters registered under several names (the MLM output bias)."""
    first, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _optimizer_to_flat(state):
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for param, slots in state["state"].items():
        meta["state"][param] = {}
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{slot}"] = value.detach().contiguous().cpu()
            else:
                meta["state"][param][slot] = value
    return tensors, meta


def _optimizer_from_flat(tensors, meta):
    state = {param: dict(slots) for param, slots in meta["state"].items()}
    for key, value in tensors.items():
        param, slot = key.rsplit("/", 1)
        state.setdefault(param, {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir, step, model, model_state, optimizer_state, state, keep=2):
    """Write checkpoint `step` from full_state_dicts' output (state: JSON-able dict), then
    prune to the newest `keep`. One process calls it (rank 0)."""
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    aliases = _tied_names(model)
    weights = {k: v.contiguous() for k, v in model_state.items() if k not in aliases}
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer_state)
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file({**opt_tensors, **rng}, os.path.join(tmp, "optimizer.safetensors"))
    _atomic_write_text(os.path.join(tmp, "state.json"),
                       json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(os.path.join(root, "latest"), name + "\n")
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(out_dir):
    """Path of the newest complete checkpoint under out_dir, or None."""
    pointer = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(out_dir, "checkpoints", f.read().strip())
    return path if os.path.isfile(os.path.join(path, "state.json")) else None


def read_state(path):
    """The JSON training state of checkpoint folder `path`."""
    state_file = os.path.join(path, "state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{path!r} is not a checkpoint folder (no state.json)")
    with open(state_file) as f:
        return json.load(f)


def check_same_config(saved, current, what="model config"):
    """Raise ValueError listing the fields where a checkpoint's config differs from ours."""
    diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"checkpoint was written with another {what}: {lines}")


def load_checkpoint(path, model, optimizer=None, *, restore_rng=False):
    """Load weights (strict), and optimizer / RNG state if given, into a plain, DDP or FSDP
    model (every rank reads the files and keeps its own shard); returns the JSON state."""
    state = read_state(path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    for alias, name in _tied_names(model).items():
        if name in weights:
            weights.setdefault(alias, weights[name])
    expected = set(model.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None or restore_rng:
        extra = load_file(os.path.join(path, "optimizer.safetensors"))
        if optimizer is not None:
            opt = {k: v for k, v in extra.items() if not k.startswith("rng.")}
            set_optimizer_state_dict(model, optimizer, _optimizer_from_flat(opt, state["optimizer"]),
                                     options=StateDictOptions(full_state_dict=True))
        if restore_rng:
            torch.set_rng_state(extra["rng.cpu"])
            cuda = [extra[k] for k in sorted(extra) if k.startswith("rng.cuda.")]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)
    return state
