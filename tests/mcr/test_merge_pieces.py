"""The local loss matches words: merge_pieces against a loop oracle, the collate function's
word_ids on a tokenizer that splits words, and the mpma and reclf losses with and without
merging."""
import numpy as np
import pytest
import torch

from mcr import cli
from mcr.data.batching import Collate
from mcr.data.synthetic import Study
from mcr.data.tokenizer import SPECIAL_TOKENS, vocab_tokenizer
from mcr.models import build_model
from mcr.models.local import merge_pieces


def merge_oracle(tokens, word_ids, word_mask):
    """merge_pieces one token at a time."""
    B, L, D = tokens.shape
    W = max(int(word_ids.max()) + 1, 1)
    words = torch.zeros(B, W, D, dtype=tokens.dtype)
    words_mask = torch.zeros(B, W, dtype=torch.bool)
    for b in range(B):
        for position in range(L):
            word = int(word_ids[b, position])
            if word >= 0 and word_mask[b, position]:
                words[b, word] = words[b, word] + tokens[b, position]
                words_mask[b, word] = True
    return words, words_mask


def random_reports(B, L, g):
    """word_ids [B, L] of reports of 0..5 words of 1..3 pieces each, [CLS] first, [SEP] and
    padding (-1) after, and word_mask [B, L]: a random share of the pieces."""
    word_ids = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        position = 1
        for word in range(int(torch.randint(0, 6, (), generator=g))):
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                if position < L - 1:
                    word_ids[b, position] = word
                    position += 1
    word_mask = (word_ids >= 0) & (torch.rand(B, L, generator=g) < 0.8)
    return word_ids, word_mask


@pytest.mark.parametrize("seed", range(4))
def test_merge_pieces_matches_the_loop_oracle_with_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, D = 5, 14, 3
    word_ids, word_mask = random_reports(B, L, g)
    tokens = torch.randn(B, L, D, dtype=torch.float64, generator=g, requires_grad=True)
    words, words_mask = merge_pieces(tokens, word_ids, word_mask)
    want, want_mask = merge_oracle(tokens, word_ids, word_mask)
    assert words.dtype == torch.float64 and torch.equal(words_mask, want_mask)
    torch.testing.assert_close(words, want, rtol=0, atol=1e-12)
    grad_out = torch.randn(words.shape, dtype=torch.float64, generator=g)
    got_grad, = torch.autograd.grad((words * grad_out).sum(), tokens)
    want_grad, = torch.autograd.grad((want * grad_out).sum(), tokens)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: merge_pieces(t, word_ids, word_mask)[0], (tokens,))


def test_merge_pieces_awkward_reports():
    """No words; one word; a word of three pieces, one outside word_mask; a word whose only
    piece is outside word_mask; [CLS], [SEP] and padding never summed."""
    word_ids = torch.tensor([[-1, -1, -1, -1, -1, -1],    # [CLS] [SEP] [PAD] ...: no words
                             [-1, 0, -1, -1, -1, -1],     # one word
                             [-1, 0, 0, 0, 1, -1],        # word 0 in three pieces, word 1
                             [-1, 0, 1, 1, 2, -1]])       # word 0 outside word_mask
    word_mask = word_ids >= 0
    word_mask[2, 3] = False                              # the last piece of word 0
    word_mask[3, 1] = False                              # the only piece of word 0
    word_mask[1, 0] = True                               # a [CLS] in word_mask: no word, not summed
    tokens = torch.arange(1, 4 * 6 + 1, dtype=torch.float32).view(4, 6, 1).expand(-1, -1, 2)
    words, words_mask = merge_pieces(tokens, word_ids, word_mask)
    assert words.shape == (4, 3, 2) and words.dtype == torch.float32
    assert words_mask.tolist() == [[False, False, False], [True, False, False], [True, True, False],
                                   [False, True, True]]
    assert words[..., 0].tolist() == [[0, 0, 0], [8, 0, 0], [14 + 15, 17, 0], [0, 21 + 22, 23]]
    assert torch.equal(words, merge_oracle(tokens, word_ids, word_mask)[0])


def test_merge_pieces_of_a_batch_without_words_gives_one_empty_row():
    words, words_mask = merge_pieces(torch.randn(2, 3, 4), torch.full((2, 3), -1), torch.zeros(2, 3, dtype=torch.bool))
    assert words.shape == (2, 1, 4) and not words.any() and not words_mask.any()


def test_merge_pieces_of_one_piece_words_is_the_identity():
    """A report of single-piece words, [CLS] and [SEP] around: its words are its tokens."""
    tokens = torch.randn(2, 6, 4)
    word_ids = torch.tensor([[-1, 0, 1, 2, 3, -1], [-1, 0, 1, -1, -1, -1]])
    words, words_mask = merge_pieces(tokens, word_ids, word_ids >= 0)
    assert torch.equal(words_mask, (word_ids >= 0)[:, 1:5])
    assert torch.equal(words[words_mask], tokens[word_ids >= 0])


REPORTS = ["Small left pleural effusion.", "No pneumothorax.", "Effusions, bilateral."]


@pytest.fixture
def splitting_tokenizer(tmp_path):
    """A WordPiece tokenizer whose vocabulary splits most words of REPORTS into pieces."""
    pieces = ["small", "left", "no", "pleu", "##ral", "eff", "##usion", "##s", "pneumo", "##thorax", "bi",
              "##lat", "##eral", ".", ","]
    path = tmp_path / "vocab.txt"
    path.write_text("".join(token + "\n" for token in SPECIAL_TOKENS + pieces))
    return vocab_tokenizer(str(path))


def studies(reports):
    return [Study(image=np.zeros((8, 8), np.uint8), report=r, labels=np.zeros(2, np.float32)) for r in reports]


def test_collate_word_ids_are_the_tokenizers_words(splitting_tokenizer):
    batch = Collate(splitting_tokenizer, 32)(studies(REPORTS))
    L = batch["input_ids"].shape[1]
    for b, report in enumerate(REPORTS):
        own = [-1 if w is None else w for w in splitting_tokenizer(report).word_ids()]
        assert batch["word_ids"][b].tolist() == own + [-1] * (L - len(own))
    assert batch["word_ids"].dtype == torch.int64
    outside = batch["special_tokens_mask"].bool() | ~batch["attention_mask"].bool()
    assert torch.equal(batch["word_ids"] == -1, outside)
    pieces = splitting_tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert pieces[:9] == ["[CLS]", "small", "left", "pleu", "##ral", "eff", "##usion", ".", "[SEP]"]
    assert batch["word_ids"][0, :9].tolist() == [-1, 0, 1, 2, 2, 3, 3, 4, -1]


def split_some_words(batch):
    """`batch` (one word per token) with word 1 of report 0 in two pieces and word 2 of
    report 1 in three."""
    words = batch["word_ids"] >= 0
    starts = words.clone()
    starts[0, 3] = starts[1, 4] = starts[1, 5] = False  # pieces that continue a word
    return {**batch, "word_ids": torch.where(words, starts.long().cumsum(1) - 1, -1)}


@pytest.mark.parametrize("variant", ["mpma", "reclf"])
@pytest.mark.parametrize("unmasked", [False, True])
def test_local_loss_merges_split_words_and_no_other_loss_changes(tiny_config, variant, unmasked, make_batch,
                                                                  draw, token_ids):
    model = build_model(tiny_config(variant=variant), pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    batch = make_batch(model.cfg)
    split = split_some_words(batch)
    assert split["word_ids"][0, :4].tolist() == [-1, 0, 1, 1] and split["word_ids"][1, 3:6].tolist() == [2, 2, 2]
    masks = None if unmasked else draw(model.cfg, 4)
    losses = {}
    for merge in (True, False):
        model.cfg.local.merge_pieces = merge
        for name, b in (("split", split), ("whole", batch)):
            losses[merge, name] = model(b, masks, unmasked=unmasked)
    assert losses[True, "split"]["local"] != losses[False, "split"]["local"]
    for name, value in losses[True, "whole"].items():  # one piece per word: merging is the identity
        assert torch.equal(value, losses[False, "whole"][name]), name
    for merge in (True, False):  # the global loss and the reconstructions stay at token level
        for name in ("contrastive", "mim", "mrm"):
            assert torch.equal(losses[merge, "split"][name], losses[merge, "whole"][name]), name


def test_reclf_weighs_the_merged_words(tiny_config, make_batch, draw, token_ids):
    """RECLF's IRM and SRM weights are computed on the word rows, with the word-level mask."""
    model = build_model(tiny_config(variant="reclf"), pad_token_id=token_ids.pad, mask_token_id=token_ids.mask)
    batch = split_some_words(make_batch(model.cfg))
    seen = []
    word_weights = model.word_weights
    model.word_weights = lambda tokens, mask: seen.append((tokens.shape, mask)) or word_weights(tokens, mask)
    model(batch, draw(model.cfg, 4))
    (shape, mask), = seen
    words_per_report = (batch["word_ids"].max(1).values + 1).tolist()
    assert shape[1] == max(words_per_report) < batch["word_ids"].shape[1]
    assert mask.sum(1).tolist() == words_per_report  # masked steps match every word by default


def test_merge_pieces_flag():
    assert cli.parse_train_args([]).model.local.merge_pieces
    assert not cli.parse_train_args(["--no-local-merge-pieces"]).model.local.merge_pieces
