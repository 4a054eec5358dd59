"""The fine-grained protocol: counterfactual studies and its metrics."""
import re

import numpy as np
import pytest
import torch

from mcr.data.synthetic import ATTRIBUTES, SPLIT_OFFSETS, make_counterfactuals, make_study
from mcr.eval.finegrained import (
    counterfactual_sets,
    evaluate_finegrained,
    finegrained_metrics,
)

SIDE = {"left", "right"}
ZONE = {"upper", "lower"}
SEVERITY = {"mild", "moderate", "severe", "small", "large", "patchy", "confluent", "dense", "minimal",
            "extensive", "mildly", "moderately", "markedly"}


def words(text):
    return re.findall(r"[a-z]+", text.lower())


@pytest.mark.parametrize("index", range(SPLIT_OFFSETS["val"], SPLIT_OFFSETS["val"] + 40))
def test_counterfactual_changes_one_attribute_only(index):
    study, cfs = make_counterfactuals(index, image_size=32)
    ref = make_study(index, image_size=32)
    assert study.report == ref.report and np.array_equal(study.image, ref.image)
    for attribute, cf in cfs:
        assert attribute in ATTRIBUTES
        a, b = words(study.report), words(cf.report)
        assert len(a) == len(b), (study.report, cf.report)
        changed = {w for pair in zip(a, b) if pair[0] != pair[1] for w in pair}
        allowed = {"laterality": SIDE, "zone": ZONE, "severity": SEVERITY}[attribute]
        assert changed and changed <= allowed, (attribute, changed)
        assert not np.array_equal(cf.labels, study.labels) or attribute == "severity"
        assert not np.array_equal(cf.image, study.image)


def test_normal_studies_have_no_counterfactuals_and_sets_skip_them():
    sets = counterfactual_sets(20, image_size=32)
    assert len(sets) == 20 and all(cfs for _, cfs in sets)
    normal = next(i for i in range(SPLIT_OFFSETS["val"], SPLIT_OFFSETS["val"] + 100)
                  if make_study(i, image_size=32).labels[0] == 1)
    assert make_counterfactuals(normal, image_size=32)[1] == []


def test_metrics_by_hand():
    true = torch.tensor([0.9, 0.2])
    cf = [torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.1, 0.0])]
    attrs = [["laterality", "severity"], ["zone", "laterality", "severity"]]
    out = finegrained_metrics(true, cf, attrs)
    assert out["R@1"] == 50.0                      # query 0 wins both, query 1 loses to 0.3
    assert out["pairwise"] == pytest.approx(100 * 4 / 5)
    assert out["chance_R@1"] == pytest.approx(100 * (1 / 3 + 1 / 4) / 2)
    assert out["pairwise_laterality"] == 100.0 and out["pairwise_zone"] == 0.0
    assert out["pairwise_severity"] == 100.0


class Oracle(torch.nn.Module):
    """Embeds a study by its pixels and its report's words, so true pairs score highest."""

    cfg = None

    def embed(self, imgs, input_ids, attention_mask, special_tokens_mask=None):
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(imgs[0].numel(), 64, generator=g)
        img = torch.nn.functional.normalize(imgs.flatten(1) @ proj, dim=-1)
        return img, img.clone()  # text = image: a perfect matcher of its own pair


def test_evaluate_finegrained_perfect_matcher_scores_100(tiny_config):
    from mcr.data.batching import Collate
    from mcr.data.tokenizer import train_wordpiece

    sets = counterfactual_sets(8, image_size=32)
    tok = train_wordpiece([s.report for s, _ in sets], 200)
    out = evaluate_finegrained(Oracle(), Collate(tok, 64), torch.device("cpu"), num_studies=8, image_size=32)
    assert out["queries"] == 8 and out["pairs"] == sum(len(c) for _, c in sets)
    for direction in ("i2t", "t2i"):
        assert out[direction]["R@1"] == 100.0 and out[direction]["pairwise"] == 100.0


class Constant(Oracle):
    """A collapsed model: every image and report gets the same embedding (NaN when asked)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def embed(self, imgs, input_ids, attention_mask, special_tokens_mask=None):
        out = torch.full((imgs.shape[0], 8), self.value)
        return out, out.clone()


def test_a_collapsed_model_scores_no_fine_grained_hit_and_nan_is_an_error():
    from mcr.data.batching import Collate
    from mcr.data.tokenizer import train_wordpiece

    sets = counterfactual_sets(6, image_size=32)
    collate = Collate(train_wordpiece([s.report for s, _ in sets], 200), 64)
    out = evaluate_finegrained(Constant(0.5), collate, torch.device("cpu"), num_studies=6, image_size=32)
    for direction in ("i2t", "t2i"):  # every counterfactual ties with the true item: a tie is a miss
        assert out[direction]["R@1"] == 0.0 and out[direction]["pairwise"] == 0.0
    with pytest.raises(ValueError, match="^image embeddings: .* NaN or infinite"):
        evaluate_finegrained(Constant(float("nan")), collate, torch.device("cpu"), num_studies=6, image_size=32)
