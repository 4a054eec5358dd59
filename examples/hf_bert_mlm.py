"""Masked-language-model fine-tuning of a HF BERT with mcr_kernels' attention: one line,
`apply_to_hf(model)`. Stock dropout (0.1) included: those attention calls run torch's SDPA.

    python examples/hf_bert_mlm.py                       # bert-base shape, random init, CPU
    python examples/hf_bert_mlm.py --model DIR --device cuda   # a local checkpoint (e.g. BERT)
    python examples/hf_bert_mlm.py --tiny --steps 2      # seconds, what the tests run

Without --model the weights are random and the batches are random token ids: the script
shows the wiring and that the loss goes down, not a useful model.
"""
import argparse

import torch
from transformers import BertConfig, BertForMaskedLM

from mcr_kernels.integrations import apply_to_hf


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local HF BertForMaskedLM directory (default: random init)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, padding included")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 BERT and short sequences")
    return parser.parse_args(argv)


def random_batch(args, vocab_size, generator):
    """Right-padded random sentences with 15% of their tokens masked (labels -100 elsewhere)."""
    B, L = args.batch_size, args.seq_len
    lengths = torch.randint(L // 2, L + 1, (B,), generator=generator)
    attention_mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.randint(1000, vocab_size, (B, L), generator=generator).masked_fill(~attention_mask, 0)
    chosen = (torch.rand(B, L, generator=generator) < 0.15) & attention_mask
    labels = ids.masked_fill(~chosen, -100)
    ids = ids.masked_fill(chosen, 103)  # [MASK]
    return {k: v.to(args.device) for k, v in
            {"input_ids": ids, "attention_mask": attention_mask.long(), "labels": labels}.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        args.seq_len = min(args.seq_len, 16)
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    else:
        config = BertConfig()
    model = BertForMaskedLM.from_pretrained(args.model) if args.model else BertForMaskedLM(config)
    print("patched:", apply_to_hf(model))  # the one line
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        loss = model(**random_batch(args, model.config.vocab_size, generator)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step} mlm loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
