"""Pictures of a run: training curves, MAE reconstructions, a retrieval grid (PNG files;
`python -m mcr.plot` is their command line).

curves.png: each loss, the temperature, the learning rate and validation R@K over steps
(from metrics.jsonl; the contrastive loss beside its chance value ln(batch), R@1 beside its
chance). reconstructions.png: 8 validation images, the patches the encoder kept, the MAE
decoder's prediction, and the prediction with the kept patches pasted back.
retrieval.png: 6 query images each beside its top-5 reports, 3 query reports each beside
their top-5 images, over the validation split; the true match framed in green and marked
"true", label sets under every item. Training writes them at its end (with matplotlib
installed: pip install "mcr[plot]") and, with --tensorboard, logs the two model pictures at
every validation. Figures are drawn with matplotlib's Agg canvas (no display needed).
"""
import json
import math
import os
import sys
import textwrap
from typing import NamedTuple

import numpy as np
import torch

from mcr import masking
from mcr.data.batching import IMAGE_MEAN, IMAGE_STD
from mcr.eval.embedding import embed, split_reports
from mcr.eval.protocols import identical_texts, require_finite

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # pictures are optional: pip install "mcr[plot]"
    Figure = None

DPI = 100
CURVES_SIZE = (16.0, 8.0)               # inches; PNGs are (width * DPI) x (height * DPI) pixels
RECONSTRUCTION_SIZE = (16.0, 9.0)
RETRIEVAL_SIZE = (18.0, 22.0)
SINGLE_QUERY_SIZE = (18.0, 3.6)         # mcr.retrieve --grid: one query row
NUM_RECONSTRUCTIONS, NUM_IMAGE_QUERIES, NUM_REPORT_QUERIES, TOP_K = 8, 6, 3, 5
TRUE_COLOR, OTHER_COLOR = "#1a9641", "#999999"


def require_matplotlib():
    if Figure is None:
        raise ImportError('pictures need matplotlib: pip install "mcr[plot]"')


def new_figure(size):
    """A matplotlib Figure on the Agg canvas (pyplot's global state is left alone)."""
    require_matplotlib()
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path):
    """Write `fig` to `path` atomically (a crash never leaves a half-written PNG)."""
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return path


# --- training curves ---------------------------------------------------------------------

def read_metrics(run_dir):
    """{"train": [rows], "val": [rows]} from run_dir/metrics.jsonl, sorted by step; a row
    logged twice for one step (a resumed run) keeps the later one; a torn last line is skipped.
    ValueError when no line is a metrics row (an empty or binary file)."""
    rows = {"train": {}, "val": {}}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a run folder?)")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("kind") in rows and isinstance(row.get("step"), int):
                rows[row["kind"]][row["step"]] = row
    if not rows["train"] and not rows["val"]:
        raise ValueError(f"{path} holds no metrics rows (empty, or not a metrics.jsonl written by mcr.train)")
    return {kind: [by_step[s] for s in sorted(by_step)] for kind, by_step in rows.items()}


def run_batch_size(run_dir):
    """The training batch of a run (from its latest checkpoint's state), or None."""
    from mcr import checkpoint

    path = checkpoint.newest_intact(run_dir, quiet=True)
    if path is None:
        return None
    return checkpoint.read_state(path)["config"].get("batch_size")


def run_labels(run_dirs):
    """Legend names: folder names, or the full paths where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def curves_figure(run_dirs):
    """Training curves of one run or several overlaid (colour = run; in the R@K panels the
    line style is K: solid R@1, dashed R@5, dotted R@10)."""
    fig = new_figure(CURVES_SIZE)
    axes = fig.subplots(2, 4)
    panels = [("loss", "total loss (weighted)"), ("contrastive", "contrastive (InfoNCE)"),
              ("mim", "MIM (masked-patch MSE)"), ("mrm", "MRM (masked-token CE)"),
              ("temperature", "temperature"), ("lr", "learning rate")]
    colors = [f"C{i}" for i in range(10)]
    for r, (run_dir, name) in enumerate(zip(run_dirs, run_labels(run_dirs))):
        color = colors[r % len(colors)]
        metrics = read_metrics(run_dir)
        for ax, (key, _) in zip(axes.flat, panels):
            points = [(row["step"], row[key]) for row in metrics["train"] if key in row]
            if points:
                ax.plot(*zip(*points), color=color, lw=1.2, label=name)
        batch = run_batch_size(run_dir)
        if batch:
            axes[0, 1].axhline(math.log(batch), color=color, ls=":", lw=1,
                               label=f"chance ln({batch})" if len(run_dirs) == 1 else None)
        for ax, direction in zip(axes[1, 2:], ("i2t", "t2i")):
            for k, style in (("R@1", "-"), ("R@5", "--"), ("R@10", ":")):
                points = [(row["step"], row[f"{direction}_{k}"]) for row in metrics["val"]
                          if f"{direction}_{k}" in row]
                if points:
                    ax.plot(*zip(*points), color=color, ls=style, marker="o", ms=3, lw=1.2,
                            label=f"{k}" if len(run_dirs) == 1 else f"{name} {k}")
            chance = [row[f"{direction}_chance_R@1"] for row in metrics["val"] if f"{direction}_chance_R@1" in row]
            if chance:
                ax.axhline(chance[-1], color=OTHER_COLOR, ls="-.", lw=1,
                           label=f"chance R@1 {chance[-1]:.2g}%" if r == 0 else None)
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set_title(title)
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].legend(fontsize=8)
    axes[1, 2].set_title("validation image→report R@K (%)")
    axes[1, 3].set_title("validation report→image R@K (%)")
    for ax in axes[1, 2:]:
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("training curves: " + ", ".join(run_labels(run_dirs)))
    fig.tight_layout()
    return fig


# --- MAE reconstructions -----------------------------------------------------------------

def unpatchify(patches, patch_size, channels):
    """[B, N, p*p*C] (row-major patches, MCR.patchify's order) -> [B, C, H, W]."""
    B, N, _ = patches.shape
    side = math.isqrt(N)
    x = patches.reshape(B, side, side, patch_size, patch_size, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, side * patch_size, side * patch_size)


@torch.no_grad()
def reconstruct(model, images, seed=0):
    """MAE reconstruction of normalized images [B, C, H, W] with masks drawn from `seed`:
    (mask [B, N] float, 1 = dropped; prediction [B, C, H, W] in the input's normalization).
    With norm_pix_loss the per-patch normalized prediction is mapped back with each target
    patch's mean and std (as MAE's visualisation does)."""
    was_training = model.training
    model.eval()
    device = images.device
    masks = masking.draw(model.cfg, images.shape[0], device=device,
                         generator=torch.Generator(device=device).manual_seed(seed))
    latent = model.encode_image(images, masks.ids_keep)
    pred = model.reconstruct_image(latent, masks.ids_restore).float()
    if model.cfg.norm_pix_loss:
        target = model.patchify(images).float()
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    model.train(was_training)
    return masks.patch_mask(), unpatchify(pred, model.cfg.patch_size, images.shape[1])


def to_pixels(images):
    """Normalized [B, C, H, W] -> uint8-range float [B, H, W] of the first channel."""
    return (images[:, 0].float() * IMAGE_STD + IMAGE_MEAN).clamp(0, 1).mul(255).cpu()


def reconstruction_figure(patch_size, images, mask, pred):
    """Input, kept patches, prediction, prediction with the kept patches pasted back, for
    each of the normalized images [B <= 8, C, H, W], from reconstruct's (mask, pred); the
    title gives the masked-patch MSE beside a baseline: every dropped patch predicted as the
    mean of the kept pixels."""
    p = patch_size
    images, mask, pred = images.cpu(), mask.cpu(), pred.cpu()
    side = images.shape[-1] // p
    pixel_mask = mask.reshape(-1, side, side).repeat_interleave(p, 1).repeat_interleave(p, 2)
    inputs, preds = to_pixels(images), to_pixels(pred)
    kept = pixel_mask == 0
    visible = torch.where(kept, inputs, torch.full_like(inputs, 0.5 * 255))
    pasted = torch.where(kept, inputs, preds)
    norm_in, norm_pred = images[:, 0].float(), pred[:, 0].float()
    dropped = ~kept
    mse = ((norm_pred - norm_in) ** 2)[dropped].mean().item()
    kept_mean = (norm_in * kept).sum((1, 2), keepdim=True) / kept.sum((1, 2), keepdim=True)
    baseline = ((kept_mean.expand_as(norm_in) - norm_in) ** 2)[dropped].mean().item()
    fig = new_figure(RECONSTRUCTION_SIZE)
    columns = ("input", f"kept patches ({100 * kept.float().mean():.0f}%)", "reconstruction",
               "reconstruction + kept")
    n = images.shape[0]
    per_row = 2  # two images side by side: 4 rows x 8 panels for 8 images
    axes = fig.subplots(math.ceil(n / per_row), per_row * len(columns), squeeze=False)
    for i in range(axes.size // len(columns)):
        row, group = divmod(i, per_row)
        for c, picture in enumerate((inputs, visible, preds, pasted)):
            ax = axes[row, group * len(columns) + c]
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= n:
                ax.set_axis_off()
                continue
            ax.imshow(picture[i].numpy(), cmap="gray", vmin=0, vmax=255)
            if row == 0:
                ax.set_title(columns[c], fontsize=10)
            if c == 0:
                ax.set_ylabel(f"val #{i}", fontsize=9)
    fig.suptitle(f"MAE reconstructions of {n} validation images: MSE on dropped patches {mse:.3f} "
                 f"(normalized pixels; baseline, each dropped patch = mean of kept pixels: {baseline:.3f})")
    fig.tight_layout()
    return fig


# --- retrieval grid ----------------------------------------------------------------------

def label_text(labels, label_names):
    """'cardiomegaly, pleural_effusion_left' from a multi-hot vector; '' without names."""
    if not label_names or labels is None or len(labels) == 0:
        return ""
    names = [label_names[j].replace("_", " ") for j in np.flatnonzero(np.asarray(labels) == 1)]
    return ", ".join(names) if names else "(no labels)"


def report_excerpt(report, width, max_lines, impression_only=True):
    """The report wrapped to `width` columns and cut at `max_lines`; impression_only: its
    IMPRESSION section when it has one."""
    _, sep, impression = report.partition("IMPRESSION:")
    text = f"IMPRESSION: {impression.strip()}" if impression_only and sep and impression.strip() else report
    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:width - 1] + "…"
    return "\n".join(lines)


def _frame(ax, color, width):
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _header(rank, score, is_true):
    return f"#{rank}  {score:.3f}" + ("  ✓ true" if is_true else "")


def _draw_report(ax, header, labels, report, is_true, width=38, max_lines=4, impression_only=True):
    """A report panel: header line, label set (blue, up to 2 lines), the report excerpt."""
    ax.set_xticks([])
    ax.set_yticks([])
    color = TRUE_COLOR if is_true else "black"
    ax.text(0.03, 0.95, header, transform=ax.transAxes, va="top", fontsize=10, fontweight="bold", color=color)
    label_lines = textwrap.wrap(labels, int(width * 1.05))[:2]
    ax.text(0.03, 0.77, "\n".join(label_lines), transform=ax.transAxes, va="top", fontsize=8.5, color="#2b5d9b")
    ax.text(0.03, 0.72 - 0.12 * len(label_lines), report_excerpt(report, width, max_lines, impression_only),
            transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    _frame(ax, TRUE_COLOR if is_true else OTHER_COLOR, 3 if is_true else 0.8)


def _draw_image(ax, title, labels, image, is_true):
    """An image panel: title above (rank, score), label set below."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9.5, fontweight="bold", color=TRUE_COLOR if is_true else "black")
    ax.set_xlabel("\n".join(textwrap.wrap(labels, 28)[:2]), fontsize=8, color="#2b5d9b")
    _frame(ax, TRUE_COLOR if is_true else OTHER_COLOR, 4 if is_true else 0.8)


class Hit(NamedTuple):
    """One retrieved item: its score, the report text or uint8 [H, W] image, labels [C] or
    None, and whether it is a true match (None: unknown, nothing marked)."""
    score: float
    item: object
    labels: object
    is_true: object


class Query(NamedTuple):
    """A query (report text or uint8 [H, W] image) with its top hits; true_rank: where its
    best true match ranks in the whole gallery (None: unknown)."""
    item: object
    labels: object
    name: str
    hits: list
    true_rank: object = None


def _rank_line(query, gallery_size):
    return "" if query.true_rank is None else f"true match: rank {query.true_rank} of {gallery_size}"


def retrieval_figure(image_queries, report_queries, label_names=None, title="", gallery_size=None, size=None):
    """The retrieval grid: a row per Query; image_queries have report Hits, report_queries
    image Hits. Either list may be empty; true matches framed in green."""
    k = max([len(q.hits) for q in image_queries + report_queries] or [1])
    fig = new_figure(size or RETRIEVAL_SIZE)
    parts = [(rows, h) for rows, h in ((image_queries, 2.3 * len(image_queries)),
                                       (report_queries, 2.6 * len(report_queries))) if rows]
    subfigs = fig.subfigures(len(parts), 1, height_ratios=[h for _, h in parts], squeeze=False)[:, 0]
    for subfig, (rows, _) in zip(subfigs, parts):
        images_to_reports = rows is image_queries
        ratios = [1.2] + [2.5] * k if images_to_reports else [2.6] + [1] * k
        axes = subfig.subplots(len(rows), 1 + k, squeeze=False, width_ratios=ratios)
        subfig.suptitle(f"image → report: each query image beside its top-{k} reports" if images_to_reports
                        else f"report → image: each query report beside its top-{k} images",
                        fontsize=12, x=0.01, ha="left")
        for r, query in enumerate(rows):
            qax = axes[r, 0]
            query_labels = label_text(query.labels, label_names)
            if images_to_reports:
                _draw_image(qax, f"query {query.name}", query_labels, query.item, False)
                if query.true_rank is not None:
                    qax.set_title(f"query {query.name}\n{_rank_line(query, gallery_size)}", fontsize=9)
            else:
                _draw_report(qax, f"query {query.name}   {_rank_line(query, gallery_size)}", query_labels,
                             query.item, False, width=72, max_lines=7, impression_only=False)
                _frame(qax, "black", 1.5)
            for c in range(k):
                ax = axes[r, 1 + c]
                if c >= len(query.hits):
                    ax.set_axis_off()
                    continue
                hit = query.hits[c]
                draw = _draw_report if images_to_reports else _draw_image
                draw(ax, _header(c + 1, hit.score, hit.is_true), label_text(hit.labels, label_names), hit.item,
                     bool(hit.is_true))
        subfig.subplots_adjust(left=0.01, right=0.99, top=0.93 if images_to_reports else 0.9,
                               bottom=0.05 if images_to_reports else 0.1, wspace=0.06,
                               hspace=0.6 if images_to_reports else 0.5)
    if title:
        fig.text(0.99, 0.998, title, ha="right", va="top", fontsize=9, color="#444444")
    return fig


def spaced(n, count, offset=0.0):
    """`count` indices spread evenly over range(n) (fewer when n is smaller)."""
    count = min(count, n)
    return sorted({int((i + offset) * n / count) % n for i in range(count)})


def best_true_rank(scores, is_true):
    """1 + the number of non-matches scored at or above the best true match: the pessimistic
    rank of mcr.eval.protocols.retrieval_metrics (a tie counts against the query)."""
    best = scores[is_true].max()
    return 1 + int(((scores >= best) & ~is_true).sum())


@torch.no_grad()
def validation_pictures(model, dataset, collate, device, autocast_dtype=None, draw=True, num_workers=0):
    """{"reconstructions": Figure, "retrieval": Figure} of a model on a held-out split: the
    retrieval grid over the whole split, embedded by mcr.eval.embedding.embed (the evaluation path).
    Under torch.distributed every rank calls it (the embedding and, under FSDP, the forward
    are collectives); ranks with draw=False compute their share and get None."""
    was_training = model.training
    img, txt, labels = embed(model, dataset, collate, device, autocast_dtype, num_workers=num_workers)
    first = collate([dataset[i] for i in range(min(NUM_RECONSTRUCTIONS, len(dataset)))])
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        mask, pred = reconstruct(model, first["image"].to(device))
    model.train(was_training)
    if not draw:
        return None
    require_finite(img, "image embeddings")
    require_finite(txt, "report embeddings")
    recon = reconstruction_figure(model.cfg.patch_size, first["image"], mask, pred)
    reports = split_reports(dataset)
    hits = identical_texts(reports)
    sim = img @ txt.T
    k = min(TOP_K, len(dataset))
    labels = labels.numpy()
    image_queries, report_queries = [], []
    for q in spaced(len(dataset), NUM_IMAGE_QUERIES):
        scores, top = sim[q].topk(k)
        image_queries.append(Query(dataset[q].image, labels[q], f"val #{q}",
                                   [Hit(s, reports[j], labels[j], bool(hits[q, j]))
                                    for s, j in zip(scores.tolist(), top.tolist())],
                                   best_true_rank(sim[q], hits[q])))
    for q in spaced(len(dataset), NUM_REPORT_QUERIES, offset=0.5):
        scores, top = sim[:, q].topk(k)
        report_queries.append(Query(reports[q], labels[q], f"val #{q}",
                                    [Hit(s, dataset[j].image, labels[j], bool(hits[j, q]))
                                     for s, j in zip(scores.tolist(), top.tolist())],
                                    best_true_rank(sim[:, q], hits[:, q])))
    n = len(dataset)
    title = (f"{n} validation pairs; score = cosine similarity; green = the query's own pair or a "
             f"report with identical text; chance that a random item is true ≈ {100 * hits.float().mean():.2g}%")
    retrieval = retrieval_figure(image_queries, report_queries, getattr(dataset, "label_names", None), title,
                                 gallery_size=n)
    return {"reconstructions": recon, "retrieval": retrieval}


def log_to_tensorboard(writer, model, dataset, collate, device, step, autocast_dtype=None, num_workers=0):
    """Add validation_pictures to a torch.utils.tensorboard SummaryWriter at `step` (tags
    val/reconstructions, val/retrieval). Every rank calls it; writer None on the others. A
    no-op without matplotlib."""
    if Figure is None:
        return
    figures = validation_pictures(model, dataset, collate, device, autocast_dtype, draw=writer is not None,
                                  num_workers=num_workers)
    for name, fig in (figures or {}).items():
        writer.add_figure(f"val/{name}", fig, step)


# --- run folders -------------------------------------------------------------------------

def write_pictures(run_dir, split="val", size=0):
    """Load run_dir's latest checkpoint and write reconstructions.png and retrieval.png
    over `split` (size: pairs, synthetic data; 0 = the run's validation size) beside
    curves.png. Returns the paths written; FileNotFoundError or ValueError, before writing
    anything, when the run holds no intact checkpoint with finite weights."""
    from mcr.run import build_dataset, collate_for, load_trained

    model, cfg, tokenizer, device, _ = load_trained(run_dir)  # refuses a broken or non-finite checkpoint first
    written = [save_png(curves_figure([run_dir]), os.path.join(run_dir, "curves.png"))]
    dataset = build_dataset(cfg, split, size or cfg.val_size)
    for name, fig in validation_pictures(model, dataset, collate_for(cfg, tokenizer), device).items():
        written.append(save_png(fig, os.path.join(run_dir, f"{name}.png")))
    return written


def after_training(run_dir):
    """Training's last step: the run's pictures, or a note when matplotlib is missing."""
    if Figure is None:
        print('pictures skipped: matplotlib is not installed (pip install "mcr[plot]")', file=sys.stderr)
        return []
    try:
        written = write_pictures(run_dir)
    except Exception as err:  # a finished run stays finished: its results and checkpoint are saved
        print(f"pictures not written ({type(err).__name__}: {err}); draw them with "
              f"`python -m mcr.plot {run_dir}`", file=sys.stderr)
        return []
    print("pictures: " + ", ".join(written))
    return written
