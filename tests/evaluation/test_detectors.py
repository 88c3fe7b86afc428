"""The real GenEval detector path (Mask2Former + CLIP), exercised with tiny randomly initialised models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selfe_cli.errors import UserError
from selfe_cli.evaluation import detectors as D
from selfe_cli.evaluation.geneval import evaluate_folder, write_prompt_folder


def test_instance_postprocess_scores_boxes_and_overlaps():
    # 2 queries, 3 classes (+ no-object); both masks overlap, both must be kept
    class_logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 1.0]])
    mask_logits = torch.full((2, 6, 8), -5.0)
    mask_logits[0, 1:4, 2:6] = 2.0  # rows 1-3, cols 2-5
    mask_logits[1, 2:5, 3:8] = 1.0
    labels, scores, binary, boxes = D.instance_postprocess(class_logits, mask_logits, topk=6)
    probs = class_logits.softmax(-1)[:, :-1]
    # the best (query, class) pair: query 0, class 0
    assert labels[0] == 0
    expected0 = probs[0, 0] * torch.sigmoid(torch.tensor(2.0))
    assert scores[0].item() == pytest.approx(expected0.item(), rel=1e-5)
    assert boxes[0].tolist() == [2.0, 1.0, 6.0, 4.0]  # x1, y1 exclusive
    # query 1 / class 1 is also there, with its own mask (overlap kept, no NMS)
    k = [i for i in range(len(labels)) if labels[i] == 1 and binary[i].sum() == 15]
    assert k and boxes[k[0]].tolist() == [3.0, 2.0, 8.0, 5.0]
    assert len(labels) == 6  # top-k over (query, class) pairs, not over queries


def test_mmdet_rescale_size():
    assert D.mmdet_rescale_size(512, 512) == (800, 800)
    assert D.mmdet_rescale_size(640, 480) == (1067, 800)
    assert D.mmdet_rescale_size(2000, 500) == (1333, 333)


def test_masks_to_boxes_empty():
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    m[1, 3, 0] = True
    assert D.masks_to_boxes(m).tolist() == [[0, 0, 0, 0], [0, 3, 1, 4]]


def test_geneval_names_for_coco():
    assert len(D.COCO_CLASSES) == 80
    from selfe_cli.evaluation.geneval import load_geneval_prompts

    names = {D.COCO_TO_GENEVAL.get(c, c) for c in D.COCO_CLASSES}
    used = {r["class"] for p in load_geneval_prompts() for r in p["include"] + p.get("exclude", [])}
    assert used <= names and "computer mouse" in names and "mouse" not in names


@pytest.fixture(scope="module")
def tiny_detector():
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=64, num_queries=12, num_labels=80,
                            id2label=dict(enumerate(D.COCO_CLASSES)), label2id={c: i for i, c in enumerate(D.COCO_CLASSES)})
    model = Mask2FormerForUniversalSegmentation(cfg)
    return D.Mask2FormerDetector(model, Mask2FormerImageProcessor(), short_side=96, long_side=160)


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-B-32", pretrained=None, embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    return D.ClipColorClassifier(model, open_clip.image_transform(32, is_train=False),
                                 open_clip.get_tokenizer("ViT-B-32"))


def test_tiny_mask2former_detect(tiny_detector):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8))
    found = tiny_detector.detect(img)
    n = sum(len(v) for v in found.values())
    assert n == 100  # top-100 of the 12 x 80 (query, class) pairs
    for name, dets in found.items():
        assert name in {D.COCO_TO_GENEVAL.get(c, c) for c in D.COCO_CLASSES}
        for d in dets:
            assert d["mask"].shape == (40, 64)  # masks at the original resolution
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 40
            assert 0.0 <= d["score"] <= 1.0


def test_clip_crop_on_grey_and_classify(tiny_clip):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:9] = True
    crop = tiny_clip.crop(img, [2, 1, 10, 6], mask)
    arr = np.asarray(crop)
    assert arr.shape == (5, 8, 3)
    assert tuple(arr[0, 0]) == (0x99, 0x99, 0x99)  # outside the mask: grey
    assert tuple(arr[1, 1]) == (255, 0, 0)  # inside: the object
    weights = tiny_clip.text_weights("car")
    assert weights.shape == (32, 10)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(10))
    colours = tiny_clip.classify(img, [([2, 1, 10, 6], mask), ([0, 0, 20, 10], None)], "car")
    assert len(colours) == 2 and all(c in D.COLORS for c in colours)


class FixedDetector:
    def __init__(self, found):
        self.found = found

    def detect(self, image):
        return {k: [dict(d) for d in v] for k, v in self.found.items()}


def test_colour_only_for_top_count(tiny_clip):
    mask = np.ones((10, 10), dtype=bool)
    found = {"car": [{"box": [0, 0, 5, 5], "score": 0.5, "mask": mask}, {"box": [5, 5, 10, 10], "score": 0.9, "mask": mask},
                     {"box": [0, 0, 2, 2], "score": 0.2, "mask": mask}],
             "dog": [{"box": [0, 0, 5, 5], "score": 0.9, "mask": mask}]}
    det = D.GenEvalDetector(FixedDetector(found), tiny_clip)
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
    out = det(Image.new("RGB", (10, 10)), meta)
    cars = {tuple(d["box"]): d["color"] for d in out["car"]}
    assert cars[(5, 5, 10, 10)] in D.COLORS  # the most confident car
    assert cars[(0, 0, 5, 5)] is None and cars[(0, 0, 2, 2)] is None
    assert out["dog"][0]["color"] is None
    assert all("mask" not in d for v in out.values() for d in v)


def test_whole_scoring_path_with_tiny_models(tiny_detector, tiny_clip, tmp_path):
    prompts = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"},
               {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
                "prompt": "two dogs"}]
    rng = np.random.default_rng(1)
    for i, p in enumerate(prompts):
        write_prompt_folder(tmp_path, i, p, [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)])
    records = evaluate_folder(tmp_path, D.GenEvalDetector(tiny_detector, tiny_clip))
    assert len(records) == 2
    assert {r["tag"] for r in records} == {"colors", "counting"}
    assert all(isinstance(r["correct"], bool) and r["reason"] for r in records)  # random nets find nothing


def test_missing_local_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--detector-path"):
        D.Mask2FormerDetector.load(tmp_path / "nope")
    with pytest.raises(UserError, match="--clip-path"):
        D.ClipColorClassifier.load(tmp_path / "nope.pt")
