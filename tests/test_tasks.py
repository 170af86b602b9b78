"""Task detection and scoring: what the model predicts and how it is scored."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncheck
from bncheck.errors import InputError, ShapeMismatchError
from bncheck.tasks import Task, infer_task, score_samples, select_output


def test_output_selection_from_tuples_dicts_and_objects():
    logits, aux = torch.randn(4, 3), torch.randn(4, 7)

    class Output:
        def __init__(self):
            self.logits = logits

    assert select_output((logits, aux)) is logits
    assert select_output((logits, aux), output_index=1) is aux
    assert select_output({"logits": logits, "aux": aux}) is logits
    assert select_output({"aux": aux, "x": logits}, output_key="aux") is aux
    assert select_output(Output()) is logits
    with pytest.raises(InputError, match="--output-key"):
        select_output({"a": logits, "b": aux})
    with pytest.raises(InputError, match="out of range"):
        select_output((logits,), output_index=3)


@pytest.mark.parametrize("outputs, targets, task", [
    (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), Task.CLASSIFICATION),
    (torch.randn(4, 3), F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float(), Task.CLASSIFICATION),
    (torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4, 5, 5)), Task.SEGMENTATION),
    (torch.randn(4, 3), torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]).float(), Task.MULTILABEL),
    (torch.randn(4, 2), torch.randn(4, 2), Task.REGRESSION),
    (torch.randn(4, 1), torch.randn(4), Task.REGRESSION),
    (torch.randn(4, 3), None, Task.LABEL_FREE),
])
def test_task_is_inferred_from_outputs_and_targets(outputs, targets, task):
    assert infer_task(outputs, targets) is task


def test_mismatched_targets_are_a_shape_error():
    with pytest.raises(ShapeMismatchError, match=r"\(4, 3\)"):
        infer_task(torch.randn(4, 3), torch.randint(0, 3, (5,)))


def test_scores_match_torch_references():
    torch.manual_seed(0)
    seg_out, seg_y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    score = score_samples(Task.SEGMENTATION, seg_out, seg_y)
    assert score.loss.shape == (2,) and score.scored == 16  # one loss and 16 pixels per image
    assert float(score.loss.sum()) / score.loss_elements == pytest.approx(float(F.cross_entropy(seg_out, seg_y)),
                                                                           rel=1e-6)
    per_image = (seg_out.argmax(1) == seg_y).double().sum(dim=(1, 2))
    torch.testing.assert_close(score.correct, per_image)

    ml_out, ml_y = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float()
    score = score_samples(Task.MULTILABEL, ml_out, ml_y)
    assert float(score.loss.sum()) / score.loss_elements == pytest.approx(
        float(F.binary_cross_entropy_with_logits(ml_out, ml_y)), rel=1e-6)
    assert float(score.correct.sum()) / (score.scored * 5) == pytest.approx(
        float(((ml_out > 0).float() == ml_y).float().mean()))

    cls_out, cls_y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    score = score_samples(Task.CLASSIFICATION, cls_out, cls_y)
    torch.testing.assert_close(score.loss, F.cross_entropy(cls_out, cls_y, reduction="none").double())
    torch.testing.assert_close(score.correct, (cls_out.argmax(1) == cls_y).double())


def test_class_targets_outside_the_outputs_are_counted_not_crashed_on():
    score = score_samples(Task.CLASSIFICATION, torch.randn(3, 3), torch.tensor([0, 7, -1]))
    assert int(score.out_of_range) == 2  # clamped to score at all, reported by the engine afterwards


class TinySegmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return {"out": self.body(x), "aux": x.mean()}


def test_segmentation_model_with_dict_output_is_scored_per_pixel():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 6, 6) * 3 + 2
    y = (x[:, 0] > 2).long()
    model = TinySegmenter()
    report = bncheck.diagnose(model, (x, y), batch_size=8, device="cpu")
    assert report.task == "segmentation"
    model.eval()
    with torch.no_grad():
        expected = float((model(x)["out"].argmax(1) == y).float().mean())
    assert report.metrics.eval.accuracy == pytest.approx(expected)


def test_dict_batches_with_custom_keys():
    torch.manual_seed(0)
    x, y = torch.randn(32, 4) * 2 + 1, torch.randint(0, 3, (32,))
    batches = [{"features": x[i:i + 8], "label": y[i:i + 8]} for i in range(0, 32, 8)]
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    report = bncheck.diagnose(model, batches, input_key="features", target_key="label", device="cpu")
    assert report.data.num_samples == 32 and report.task == "classification"
    with pytest.raises(bncheck.InputError, match="--input-key"):
        bncheck.diagnose(model, batches, device="cpu")


def test_multi_input_model_takes_a_tuple_of_tensors():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 2)

        def forward(self, a, b):
            return self.head(self.bn(torch.cat([a, b], dim=1)))

    torch.manual_seed(0)
    a, b, y = torch.randn(24, 4), torch.randn(24, 2) + 3, torch.randint(0, 2, (24,))
    batches = [((a[i:i + 8], b[i:i + 8]), y[i:i + 8]) for i in range(0, 24, 8)]
    report = bncheck.diagnose(TwoInputs(), batches, device="cpu")
    assert report.data.num_samples == 24
    assert report.layers[0].num_features == 6


@pytest.mark.parametrize("targets", [torch.tensor([0, 1, 1, 0]), torch.tensor([[0.0], [1.0], [1.0], [0.0]])])
def test_single_logit_binary_classifier(targets):
    outputs = torch.tensor([[-2.0], [3.0], [-1.0], [-0.5]])
    assert infer_task(outputs, targets) is Task.BINARY
    score = score_samples(Task.BINARY, outputs, targets)
    assert float(score.correct.sum()) == 3 and score.scored == 1
    expected = F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.float().reshape(-1))
    assert float(score.loss.sum()) / score.loss_elements == pytest.approx(float(expected))
