"""Command-line flags generated from the config dataclasses (mcr.config), with plain argparse.

Each field is one flag: `batch_size` -> --batch-size, ModelConfig's fields too (--vit-depth),
with the field's help text, its choices, its type, and as default the value in effect after
--preset and --config (so `--help --preset paper` shows the paper recipe). Booleans are
--x / --no-x. `--config FILE.yaml` sets fields (flags override it); `--print-config` prints
the resolved config as YAML (feed it back with --config) and exits. Model fields that no
flag or --config field sets come from --text-weights / --image-weights (their shape:
pretrained_shape) and, with --resume, from the run folder's config.yaml. A bad value exits
with status 2 and one line naming the flag, before any work; a --config value must have its
field's type (a YAML string is no number nor bool) and numbers must be finite.

Why argparse and not tyro or jsonargparse: what we need from them is ~100 lines here (flags
from fields, defaults after the preset, flat names for the nested model fields), and plain
argparse keeps the flags readable to anyone without a dependency between reader and CLI.
"""
import argparse
import dataclasses
import os
import sys

import yaml

from mcr.config import (
    VARIANTS,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    flag,
    model_sections,
    section_flat_names,
)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def add_fields(parser, cls, defaults, prefix=""):
    """One flag per field of dataclass `cls` (not nested dataclasses), defaults from `defaults`;
    prefix: the flag prefix of a ModelConfig section's fields (its dest is the flat name,
    e.g. local_attn_scale)."""
    for f in dataclasses.fields(cls):
        if f.type is ModelConfig or "prefix" in f.metadata:
            continue
        meta, default, name = f.metadata, getattr(defaults, f.name), flag(prefix + f.name)
        if f.type is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        else:
            parser.add_argument(name, type=f.type, choices=meta.get("choices"), default=default,
                                metavar=None if meta.get("choices") else f.type.__name__.upper(),
                                help=meta["help"])


def add_model_fields(parser, defaults):
    """The flags of ModelConfig `defaults`' fields, then of each variant section's, in a group each."""
    add_fields(parser.add_argument_group("model (defaults: the preset's shape)"), ModelConfig, defaults)
    for name, cls, prefix in model_sections():
        field_help = next(f for f in dataclasses.fields(ModelConfig) if f.name == name).metadata["help"]
        add_fields(parser.add_argument_group(f"model.{name} ({field_help})"), cls, getattr(defaults, name), prefix)


def read_config_file(path, parser):
    """The fields set in YAML file `path` (a dict), or a parser error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except UnicodeDecodeError as err:
        parser.error(f"--config {path}: not UTF-8 text ({err.reason} at byte {err.start})")
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: {' '.join(str(err).split())}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    return values


def pretrained_shape(args, model, given, parser):
    """{model field: value} that --text-weights (its config.json) and --image-weights (its
    tensors) fix, for the fields the user did not set (`given`: flags and --config fields);
    a parser error when a given value contradicts the weights or they cannot be read.
    --patch-size and --vit-heads, when given, win (the patch projection is resampled; heads
    are not in the tensors: mcr.models.weights.vit_heads_for says what is taken instead)."""
    from mcr.models import weights  # torch only when weights are named: --help answers at once

    shape, source = {}, {}
    try:
        if args["text_weights"]:
            text = weights.text_shape(args["text_weights"])
            text.pop("max_positions")
            shape.update(text)
            source.update(dict.fromkeys(text, f"--text-weights {args['text_weights']} (config.json)"))
        if args["image_weights"]:
            image = weights.image_shape(args["image_weights"])
            if "patch_size" in given:
                image.pop("patch_size")
            if "vit_heads" not in given:
                image["vit_heads"] = weights.vit_heads_for(image["vit_width"], model["vit_heads"])
            shape.update(image)
            source.update(dict.fromkeys(image, f"--image-weights {args['image_weights']}"))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    for name, value in shape.items():
        if name in given and model[name] != value:
            parser.error(f"{flag(name)} {model[name]} contradicts {source[name]}, which has {value}; leave "
                         f"{flag(name)} out to take it from the weights")
    return {name: value for name, value in shape.items() if name not in given}


def parse_train_args(argv=None, prog="python -m mcr.train", description=None):
    """argv -> a resolved TrainConfig. Order of precedence: flags, then --config FILE, then
    the preset's recipe and shape, then the dataclass defaults."""
    pre = Parser(prog=prog, add_help=False)
    pre.add_argument("--preset", choices=dataclasses.fields(TrainConfig)[0].metadata["choices"])
    pre.add_argument("--config")
    # the defaults shown depend on the variant too (dual-stream: no unmasked steps)
    pre.add_argument("--variant", choices=VARIANTS)
    known, _ = pre.parse_known_args(argv)
    values = read_config_file(known.config, pre) if known.config else {}
    if known.preset:
        values["preset"] = known.preset
    if known.variant:
        values["model"] = {**(values.get("model") or {}), "variant": known.variant}
    try:
        base = config_from_dict(values)
    except ValueError as err:
        pre.error(f"--config {known.config}: {err}" if known.config else str(err))

    parser = Parser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="read fields from this YAML file (flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_fields(parser, TrainConfig, base)
    add_model_fields(parser, base.model)
    args = vars(parser.parse_args(argv))
    print_config = args.pop("print_config")
    args.pop("config")
    model_names = {f.name for f in dataclasses.fields(ModelConfig)} | set(section_flat_names())
    model = {k: args.pop(k) for k in list(args) if k in model_names}
    from_run, from_weights = {}, {}
    run_config = os.path.join(args["out_dir"], "config.yaml")
    resuming = args["resume"] and os.path.isfile(run_config)
    if args["text_weights"] or args["image_weights"] or resuming:
        unset = object()  # the flags given are those that the parse sets to something else
        parser.set_defaults(**dict.fromkeys([*args, *model], unset))
        flags = {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}
        given = {*flags, *(values.get("model") or {}), *values}
        if resuming:  # the run's own model, where no flag or --config field sets another
            saved = read_config_file(run_config, parser).get("model")
            if not isinstance(saved, dict):
                parser.error(f"--resume: {run_config} has no model section (field: value)")
            from_run = {name: value for name, value in saved.items() if name in model and name not in given}
        if args["text_weights"] or args["image_weights"]:
            from_weights = pretrained_shape(args, model, given, parser)
    try:
        cfg = config_from_dict({**args, "model": {**model, **from_run, **from_weights}})
    except ValueError as err:
        parser.error(f"{err} (with the shape taken from the pretrained weights: "
                     f"{', '.join(f'{flag(k)} {v}' for k, v in from_weights.items())})" if from_weights else
                     f"{err} (with the model of {run_config})" if from_run else str(err))
    if print_config:
        sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        parser.exit(0)
    return cfg


def fail(prog, err):
    """Exit with status 2 and one line: what was wrong with the input."""
    sys.stderr.write(f"{prog}: error: {err}\n")
    sys.exit(2)
