"""Batching: every dataset yields Study-like records (image uint8 [H, W],
report str, labels float32 [C]); `Collate` turns them into model batches."""
import numpy as np
import torch

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25


class Collate:
    """Records -> batch dict: image float [B, C, H, W] normalized, input_ids,
    attention_mask, special_tokens_mask int64 [B, L] (padded to the longest), word_ids
    int64 [B, L] (the index 0, 1, ... within its report of the word each token is a piece
    of, -1 for special tokens and padding), labels. `tokenizer` is a fast tokenizer (its
    encodings know their words)."""

    def __init__(self, tokenizer, max_length, in_chans=1):
        self.tokenizer, self.max_length, self.in_chans = tokenizer, max_length, in_chans

    def __call__(self, studies):
        images = torch.from_numpy(np.stack([s.image for s in studies])).float().div_(255.0)
        images = ((images - IMAGE_MEAN) / IMAGE_STD).unsqueeze(1).expand(-1, self.in_chans, -1, -1)
        enc = self.tokenizer([s.report for s in studies], padding=True, truncation=True,
                             max_length=self.max_length, return_special_tokens_mask=True,
                             return_tensors="pt")
        return {
            "image": images.contiguous(),
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "special_tokens_mask": enc["special_tokens_mask"],
            "word_ids": torch.tensor([[-1 if w is None else w for w in enc.word_ids(b)] for b in range(len(studies))]),
            "labels": torch.from_numpy(np.stack([s.labels for s in studies])),
        }


def one_word_per_token(word_mask):
    """word_ids int64 [B, L] of reports whose every word position (word_mask bool [B, L]) is a
    word of its own: 0, 1, ... along each row, -1 elsewhere (random batches of token ids)."""
    return torch.where(word_mask, word_mask.long().cumsum(1) - 1, -1)
