"""MbA alignment path, forward + backward: mcr_kernels.mba_infonce (Triton) vs eager PyTorch
(map all tokens, masked mean, normalize, [B, B] logits, cross-entropy) and torch.compile of it.

    python benchmarks/bench_mba_infonce.py            # GPU: B in 256..16384, bf16, then a fit test
    python benchmarks/bench_mba_infonce.py --quick    # CPU smoke run (Triton interpreter, tiny)

Shapes (the paper preset's masked step): L_img = 99, L_txt = 128, D = 768, E = 512; the MLP head is the model's
(hidden = D, GELU), the linear head is one D -> E layer. Each row: median ms of one
forward + backward (gradients for tokens, head weights and logit_scale) and the peak
memory allocated during it above the inputs. OOM is recorded, not raised. The fit test
then runs one step at batch sizes beyond the timed ones, to find a batch eager cannot fit.
roofline_frac: the H100/H200 roofline time of one step's minimum work (benchmarks/roofline.py:
head GEMMs fwd + bwd at the dense bf16 peak, InfoNCE logits and gradients at the tf32 peak,
token bytes at HBM bandwidth) over the measured time.
Results: benchmarks/results/mba_infonce-<device>-<date>.{json,csv}.
"""
import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (slow)

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402
from _common import device_name, is_oom, peak_bytes, print_table, time_ms, write_results  # noqa: E402

import mcr_kernels  # noqa: E402


def eager_loss(img, txt, txt_mask, img_head, txt_head, scale):
    """The unfused alignment path: every token mapped and kept for backward, [B, B] logits."""
    image_emb = img_head(img).mean(1)
    m = txt_mask.unsqueeze(-1).to(txt.dtype)
    text_emb = (txt_head(txt) * m).sum(1) / m.sum(1).clamp(min=1)
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = scale * image_emb @ text_emb.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def fused_loss(img, txt, txt_mask, img_head, txt_head, scale):
    with mcr_kernels.use_backend("triton"):
        return mcr_kernels.mba_infonce(img, None, txt, txt_mask, img_head, txt_head, scale)[0]


def make_inputs(B, L_img, L_txt, D, dtype, device):
    img = torch.randn(B, L_img, D, dtype=dtype, device=device, requires_grad=True)
    txt = torch.randn(B, L_txt, D, dtype=dtype, device=device, requires_grad=True)
    lengths = torch.randint(L_txt // 4, L_txt + 1, (B, 1), device=device)
    txt_mask = torch.arange(L_txt, device=device)[None] < lengths
    return img, txt, txt_mask


def step_fn(loss_fn, inputs, heads, scale):
    img, txt, txt_mask = inputs
    params = [img, txt, *heads[0].parameters(), *heads[1].parameters(), scale]

    def step():
        loss = loss_fn(img, txt, txt_mask, *heads, scale)
        return torch.autograd.grad(loss, params)
    return step


def measure(step, repeats):
    """(ms, peak bytes) of step, or None on OOM; ms is None when repeats is 0 (fit test)."""
    try:
        peak = peak_bytes(step)
        ms = time_ms(step, warmup=2, repeats=repeats) if repeats else None
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_oom(error):
            raise
        torch.cuda.empty_cache()
        return None
    return ms, peak


def headline_ratios(rows):
    """Per head, from this run's rows: the fused path's peak memory against eager at B = 4096, its
    largest time against eager and against torch.compile, and the batches only it fits."""
    ratios = {}
    for head in dict.fromkeys(r["head"] for r in rows):
        fused = [r for r in rows if r["head"] == head and r["impl"] == "mcr_triton" and r["status"] == "ok"]
        timed = [r for r in fused if r["test"] == "timed"]
        at_4096 = [r.get("peak_vs_eager") for r in timed if r["B"] == 4096]
        eager_oom = {r["B"] for r in rows if r["head"] == head and r["impl"] == "eager" and r["status"] == "oom"}
        ratios[head] = {
            "peak_vs_eager_at_4096": at_4096[0] if at_4096 else None,
            "max_time_vs_eager": max((r["time_vs_eager"] for r in timed if "time_vs_eager" in r),
                                                 default=None),
            "max_time_vs_compiled": max((r["time_vs_compiled"] for r in timed
                                                     if "time_vs_compiled" in r), default=None),
            "batches_only_fused_fits": sorted(r["B"] for r in fused if r["B"] in eager_oom),
        }
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, runs on CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--fit-batches", type=int, nargs="+", default=None,
                        help="batch sizes for the one-step fit test (default 32768 65536 on GPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.quick:
        dims = dict(L_img=9, L_txt=12, D=48, E=32)
        batches, fit_batches, repeats, dtype = args.batches or [4, 16], args.fit_batches or [], 2, torch.float32
    else:
        dims = dict(L_img=99, L_txt=128, D=768, E=512)
        batches = args.batches or [256, 1024, 4096, 16384]
        fit_batches = args.fit_batches if args.fit_batches is not None else ([32768, 65536] if cuda else [])
        repeats, dtype = 10, torch.bfloat16
    D, E = dims["D"], dims["E"]
    impls = {"eager": eager_loss, "mcr_triton": fused_loss}
    if not args.no_compile and not args.quick:
        impls["compiled"] = torch.compile(eager_loss)
    gpu = roofline.device_for(device_name(device))
    rows = []
    for head in ("mlp", "linear"):
        hidden = D if head == "mlp" else None
        torch.manual_seed(0)
        heads = tuple(mcr_kernels.ProjectionHead(D, E, hidden).to(device=device, dtype=dtype) for _ in range(2))
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        for B in batches + fit_batches:
            timed = B in batches
            try:
                inputs = make_inputs(B, dims["L_img"], dims["L_txt"], D, dtype, device)
            except torch.OutOfMemoryError:
                rows.append(dict(head=head, B=B, impl="inputs", status="oom"))
                continue
            results, losses = {}, {}
            for name, fn in impls.items():
                if not timed and name == "compiled":
                    continue
                results[name] = measure(step_fn(fn, inputs, heads, scale), repeats if timed else 0)
                if timed and results[name] is not None:  # sanity: every impl gives the same loss
                    with torch.no_grad():
                        losses[name] = fn(*inputs, *heads, scale).item()
            # the gradients a step returns (tokens, heads, scale) are part of every peak
            grad_mib = sum(t.numel() * t.element_size() for t in (*inputs[:2], *heads[0].parameters(),
                                                                   *heads[1].parameters())) / 2 ** 20
            eager = results.get("eager")
            for name, res in results.items():
                row = dict(head=head, B=B, impl=name, test="timed" if timed else "fit")
                if res is None:
                    row.update(status="oom")
                else:
                    ms, peak = res
                    row.update(status="ok", ms=ms, peak_mib=peak / 2 ** 20, grads_mib=grad_mib,
                               loss=losses.get(name))
                    if timed:
                        work = roofline.mba_infonce(B, dims["L_img"], dims["L_txt"], D, E, hidden,
                                                    inputs[0].element_size(), roofline.matmul_precision(str(dtype)[6:]))
                        row.update(roofline_frac=roofline.fraction(work, gpu, ms))
                    if eager is not None and name != "eager":
                        if timed:
                            row.update(time_vs_eager=ms / eager[0])
                        if eager[1]:
                            row.update(peak_vs_eager=peak / eager[1])
                    if timed and results.get("compiled") and name == "mcr_triton":
                        row.update(time_vs_compiled=ms / results["compiled"][0])
                rows.append(row)
                print_table([row])
            del inputs
            if cuda:
                torch.cuda.empty_cache()
    print_table(rows, ["head", "B", "impl", "test", "status", "loss", "ms", "peak_mib", "grads_mib", "time_vs_eager",
                       "peak_vs_eager", "time_vs_compiled", "roofline_frac"])
    print(f"roofline_frac: fraction of the {gpu.name} roofline (datasheet peaks; a CPU run only checks the arithmetic)")
    ratios = headline_ratios(rows)
    print("headline ratios:", ratios)
    if not args.quick:
        extra = {"shapes": dims, "dtype": str(dtype), "mlp_hidden": D, "activation": "gelu", "headline_ratios": ratios}
        paths = write_results("mba_infonce", rows, extra=extra)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
