"""Report tokenizers: BERT-style uncased WordPiece, trained on a corpus or read from the
vocabulary shipped with the package, or a local Hugging Face tokenizer folder.

The shipped vocabulary (mcr/data/vocab/synthetic-wordpiece.txt, 569 tokens) is the one
`train_wordpiece` gives on the first 4,000 training reports of the embedded corpus (seed 0)
asked for the default 2,048 tokens: the corpus's complete WordPiece vocabulary (the trainer
runs out of merges at 569). Built once by `python -m mcr.data.tokenizer` and committed:
Hugging Face's trainer breaks frequency ties differently from run to run, so a vocabulary
trained per run made two default runs differ.
"""
import os
import sys

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHIPPED_VOCAB = os.path.join(os.path.dirname(__file__), "vocab", "synthetic-wordpiece.txt")
SHIPPED_TRAINED_AT = 2048  # the vocab_size it was trained with (ModelConfig's default)
SHIPPED_FROM_REPORTS = 4000


def _bert_pipeline(tok):
    """Lower-casing BERT normalizer and pre-tokenizer, [CLS] ... [SEP], as a transformers tokenizer."""
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def train_wordpiece(texts, vocab_size):
    """A BERT-style (uncased WordPiece) tokenizer trained on `texts`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    return _bert_pipeline(tok)


def vocab_tokenizer(path):
    """The tokenizer of a WordPiece vocabulary file (one token a line, id = line number)."""
    with open(path, encoding="utf-8") as f:
        vocab = {token: i for i, token in enumerate(f.read().splitlines())}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocabulary {path} lacks the special tokens {missing}")
    return _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))


def shipped_tokenizer():
    """The WordPiece tokenizer of the embedded corpus shipped with the package."""
    return vocab_tokenizer(SHIPPED_VOCAB)


def load_tokenizer(path):
    """A tokenizer saved with save_pretrained (ours, or e.g. BioClinicalBERT's), offline."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer at {path!r} needs [MASK] and [PAD] tokens for masked report modelling")
    if not tok.is_fast:  # the collate function reads each token's word from word_ids()
        raise ValueError(f"tokenizer at {path!r} must be a fast tokenizer (word_ids), got {type(tok).__name__}")
    return tok


def build_shipped_vocab(path=SHIPPED_VOCAB):
    """Train the shipped vocabulary (once; the result is committed) and write it to `path`."""
    from mcr.data.synthetic import SyntheticCXR

    corpus = SyntheticCXR(SHIPPED_FROM_REPORTS, split="train", image_size=32, seed=0)
    tok = train_wordpiece((corpus[i].report for i in range(len(corpus))), SHIPPED_TRAINED_AT)
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(token + "\n" for token, _ in vocab))
    return path


if __name__ == "__main__":
    print(f"wrote {build_shipped_vocab(*sys.argv[1:2])}")
