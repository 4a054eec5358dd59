"""Checkpoints: safetensors weights + optimizer, a JSON training state, written atomically.

Layout under <out_dir>/checkpoints/: one folder per step (step_00000400/ holding
model.safetensors (full weights by parameter name), optimizer.safetensors (AdamW state by
parameter name, and the RNG), state.json) and a file `latest` naming the newest
complete one. A folder is written under a temporary name (.step_*.tmpPID) and renamed
when complete, and `latest` is replaced atomically after it: a crash or kill never leaves a
half checkpoint that resume would pick, and never touches the previous checkpoints. A
step saved again (a finished run resumed) is swapped in by two renames, the old one kept
aside (.step_*.oldPID) until the new one is in place. `newest_intact` does not trust
`latest` alone: it checks every candidate's files (JSON state, safetensors headers against
file sizes) and falls back to the previous intact checkpoint. The tensors are full, never
shards, so a run resumes on any number of processes, with or without FSDP.
"""
import json
import os
import re
import shutil
import struct
import sys

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
    prune to the newest `keep`. One process calls it (rank 0). The state also records
    `log_rows`, the rows out_dir/metrics.jsonl holds now: a resume cuts the log back to them."""
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
                       json.dumps({**state, "step": step, "log_rows": _log_rows(out_dir), "optimizer": opt_meta},
                                  indent=1))
    aside = os.path.join(root, f".{name}.old{os.getpid()}")
    if os.path.isdir(final):  # saved again: keep the old one until the new one is in place
        os.replace(final, aside)
    os.replace(tmp, final)
    _atomic_write_text(os.path.join(root, "latest"), name + "\n")
    shutil.rmtree(aside, ignore_errors=True)
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _log_rows(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def latest_checkpoint(out_dir):
    """Path of the checkpoint `latest` names under out_dir when it holds a state, or None."""
    pointer = os.path.join(out_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8", errors="replace") as f:
        name = f.read().strip()
    path = os.path.join(out_dir, "checkpoints", name)
    return path if re.fullmatch(r"step_\d+", name) and os.path.isfile(os.path.join(path, "state.json")) else None


def _check_safetensors(path):
    """ValueError naming `path` unless its header parses and its size matches the header."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if 8 + header_len + end != size:
        raise ValueError(f"{path} is truncated or padded: {size} bytes, its header describes {8 + header_len + end}")


def check_intact(path):
    """ValueError naming the file when checkpoint folder `path` is incomplete or corrupt."""
    state_file = os.path.join(path, "state.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not {"step", "config"} <= set(state):
            raise ValueError("no step or config")
    except (OSError, ValueError) as err:
        raise ValueError(f"{state_file} is not a checkpoint state ({err})") from None
    for name in ("model.safetensors", "optimizer.safetensors"):
        _check_safetensors(os.path.join(path, name))


def step_folders(out_dir):
    """Names of the step_* folders under out_dir/checkpoints, newest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted((n for n in os.listdir(root) if re.fullmatch(r"step_\d+", n)), reverse=True)


def newest_intact(out_dir, quiet=False):
    """Path of the newest intact checkpoint under out_dir (by step, every candidate
    checked), or None. Says on stderr when `latest` is missing, broken or not the one
    used, and which corrupt checkpoints were passed over (unless quiet)."""
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    root = os.path.join(out_dir, "checkpoints")
    for name in step_folders(out_dir):
        path = os.path.join(root, name)
        try:
            check_intact(path)
        except ValueError as err:
            say(f"checkpoint {path} is corrupt, passed over: {err}")
            continue
        pointed = latest_checkpoint(out_dir)
        if pointed is None:
            say(f"{os.path.join(root, 'latest')} is missing or names no checkpoint; using the newest intact "
                f"one, {name}")
        elif os.path.basename(pointed) != name:
            say(f"{os.path.join(root, 'latest')} names {os.path.basename(pointed)}; using the newest intact "
                f"one, {name}")
        return path
    return None


def remove_stale_temporaries(out_dir):
    """Delete the .step_*.tmpPID folders (and latest.tmpPID files) of saves whose process is
    gone, and put back a .step_*.oldPID whose replacement never arrived. Returns what it removed."""
    root = os.path.join(out_dir, "checkpoints")
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        match = re.fullmatch(r"\.?(step_\d+|latest)\.(tmp|old)(\d+)", name)
        if not match or _process_alive(int(match.group(3))):
            continue
        path = os.path.join(root, name)
        if match.group(2) == "old" and not os.path.exists(os.path.join(root, match.group(1))):
            os.replace(path, os.path.join(root, match.group(1)))
            continue
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    return removed


def _process_alive(pid):
    if pid == os.getpid():
        return False  # a leftover of this process id's earlier life, not a save in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    model (every rank reads the files and keeps its own shard); returns the JSON state.
    ValueError naming the file when the checkpoint is corrupt."""
    check_intact(path)
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
