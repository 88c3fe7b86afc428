"""The real GenEval detector path (Mask2Former + CLIP), exercised with tiny randomly initialised models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


def test_cv2_resize_hand_computed():
    # column [33, 215] -> 6 rows: scale 1/3, row 2 sits at y = 2.5/3 - 0.5 = 0.3333334 (float32): weights
    # round(2048 * 0.6666666) = 1365 and round(2048 * 0.3333334) = 683. Rows are x 2048 after the
    # (identity) horizontal pass: 67584, 440320. Vertical: ((67584 >> 4) * 1365) >> 16 = 87,
    # ((440320 >> 4) * 683) >> 16 = 286, (87 + 286 + 2) >> 2 = 93 -- where exact bilinear gives 93.67 -> 94.
    col = np.array([[33], [215]], dtype=np.uint8)
    assert D.cv2_resize_linear(col, 1, 6)[:, 0].tolist() == [33, 33, 93, 154, 215, 215]
    exact = F.interpolate(torch.tensor([[[[33.0], [215.0]]]]), size=(6, 1), mode="bilinear", align_corners=False)
    assert exact.flatten().round().tolist() == [33, 33, 94, 154, 215, 215]
    # row [0, 2] -> 4: x = -0.25 (left pixel), 0.25, 0.75, 1.25 (right pixel); 0.5 rounds up (cv2), not to even
    assert D.cv2_resize_linear(np.array([[0, 2]], dtype=np.uint8), 4, 1).tolist() == [[0, 1, 2, 2]]
    # identity and an exact 2x downscale (cv2 runs INTER_AREA there: the same (a + b + c + d + 2) >> 2)
    img = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    assert (D.cv2_resize_linear(img, 8, 6) == img).all()
    quad = img.reshape(3, 2, 4, 2, 3).astype(int).sum((1, 3))
    assert (D.cv2_resize_linear(img, 4, 3) == (quad + 2) >> 2).all()


def test_cv2_resize_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        nh, nw = (int(v) for v in rng.integers(1, 300, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert (D.cv2_resize_linear(img, nw, nh) == cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)).all()
    img = rng.integers(0, 256, (512, 384, 3), dtype=np.uint8)
    nw, nh = D.mmdet_rescale_size(384, 512)
    assert (D.cv2_resize_linear(img, nw, nh) == cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)).all()


def test_mmdet_preprocess_matches_the_mmcv_steps():
    cv2 = pytest.importorskip("cv2")
    rgb = np.random.default_rng(1).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    pixels, (new_h, new_w) = D.mmdet_preprocess(Image.fromarray(rgb), short=96, long=160)
    assert (new_h, new_w) == (96, 154) and pixels.shape == (1, 3, 96, 160)
    # mmcv on the BGR file image: imrescale (cv2 bilinear), impad_to_multiple (128), imnormalize (float32)
    bgr = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    bgr = cv2.copyMakeBorder(bgr, 0, 0, 0, 160 - new_w, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    img = bgr.astype(np.float32)
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, np.float64([[123.675, 116.28, 103.53]]), img)
    cv2.multiply(img, 1 / np.float64([[58.395, 57.12, 57.375]]), img)
    torch.testing.assert_close(pixels[0], torch.from_numpy(img).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_mmdet_preprocess_pads_grey_before_normalising():
    rgb = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels, (new_h, new_w) = D.mmdet_preprocess(Image.fromarray(rgb), short=96, long=160)
    # scale min(160 / 64, 96 / 40) = 2.4 -> 154 x 96, padded to 160 x 96 (multiple of 32)
    assert (new_h, new_w) == (96, 154) and pixels.shape == (1, 3, 96, 160)
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(pixels[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(pixels[0, :, -1, -1], (128 - mean) / std)  # pad value 128, then normalised
    assert torch.equal(pixels[0, :, :, 154:], pixels[0, :, :1, -1:].expand(3, 96, 6))


def test_detector_labels_must_hold_the_80_geneval_classes():
    from types import SimpleNamespace

    assert len(D.GENEVAL_CLASSES) == 80 and D.GENEVAL_CLASSES[64:67] == (
        "computer mouse", "tv remote", "computer keyboard")
    names = list(D.COCO_CLASSES)
    names[names.index("tv")], names[names.index("remote")] = "tvmonitor", "remote control"
    model = SimpleNamespace(config=SimpleNamespace(id2label=dict(enumerate(names))))
    with pytest.raises(UserError, match=r"lack 2 of the 80 GenEval classes: tv, tv remote \(") as err:
        D.Mask2FormerDetector(model)
    assert "\n" not in str(err.value)


def test_geneval_names_for_coco():
    assert len(D.COCO_CLASSES) == 80
    from selfe_cli.evaluation.geneval import load_geneval_prompts

    names = {D.COCO_TO_GENEVAL.get(c, c) for c in D.COCO_CLASSES}
    used = {r["class"] for p in load_geneval_prompts() for r in p["include"] + p.get("exclude", [])}
    assert used <= names and "computer mouse" in names and "mouse" not in names


@pytest.fixture(scope="module")
def tiny_detector():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(0)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=64, num_queries=12, num_labels=80,
                            id2label=dict(enumerate(D.COCO_CLASSES)), label2id={c: i for i, c in enumerate(D.COCO_CLASSES)})
    model = Mask2FormerForUniversalSegmentation(cfg)
    return D.Mask2FormerDetector(model, short_side=96, long_side=160)


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
