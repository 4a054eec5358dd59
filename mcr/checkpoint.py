"""Checkpoints: safetensors weights + optimizer, a JSON training state, written atomically.

Layout under <out_dir>/checkpoints/: one folder per step (step_00000400/ holding
model.safetensors, optimizer.safetensors, state.json) and a file `latest` naming the newest
complete one. A folder is written under a temporary name and renamed when complete, and
`latest` is replaced atomically after it: a crash or kill never leaves a half checkpoint
that resume would pick, and never touches the previous checkpoints.
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer_to_flat(optimizer):
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        meta["state"][str(idx)] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                meta["state"][str(idx)][name] = value
    return tensors, meta


def _optimizer_from_flat(tensors, meta):
    state = {int(idx): dict(slots) for idx, slots in meta["state"].items()}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir, step, model, optimizer, state, keep=2):
    """Write checkpoint `step` (state: JSON-able dict), then prune to the newest `keep`."""
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
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
    """Load weights (strict), and optimizer / RNG state if given; returns the JSON state."""
    state = read_state(path)
    missing, unexpected = load_model(model, os.path.join(path, "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    if optimizer is not None or restore_rng:
        extra = load_file(os.path.join(path, "optimizer.safetensors"))
        if optimizer is not None:
            opt = {k: v for k, v in extra.items() if not k.startswith("rng.")}
            optimizer.load_state_dict(_optimizer_from_flat(opt, state["optimizer"]))
        if restore_rng:
            torch.set_rng_state(extra["rng.cpu"])
            cuda = [extra[k] for k in sorted(extra) if k.startswith("rng.cuda.")]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)
    return state
