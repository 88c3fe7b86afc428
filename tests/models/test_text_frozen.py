"""Frozen T5 + CLIP text conditioner: tiny encoders built from configs, offline tokenizers, the disk cache."""

from __future__ import annotations

import pytest
import torch

from selfe_cli.errors import UserError
from selfe_cli.models import make_conditioner
from selfe_cli.models.mmdit import MMDiT
from selfe_cli.models.text_frozen import (
    FrozenTextConditioner,
    TextEmbeddingCache,
    check_tokenizer,
    clip_tokenizer_offline,
    load_clip_text,
    load_t5_encoder,
)

WORDS = "a red blue green cube ball sphere two one fake image".split()


@pytest.fixture(scope="module")
def encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407,
                                        projection_dim=32)).eval()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -3.0) for w in WORDS]
    t5_tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    return (t5, t5_tok), (clip, clip_tokenizer_offline())


def _cond(encoders, tmp_path, **kw) -> FrozenTextConditioner:
    t5, clip = encoders
    return FrozenTextConditioner(t5_modules=t5, clip_modules=clip, t5_max_length=8, cache_dir=tmp_path, **kw)


def test_encode_matches_the_encoders(encoders, tmp_path):
    cond = _cond(encoders, tmp_path)
    out = cond.encode(["a red cube", "two blue green balls", ""])
    assert out["context"].shape == (3, 8, 16) and out["mask"].shape == (3, 8) and out["pooled"].shape == (3, 32)
    assert out["mask"].dtype == torch.bool
    (t5, t5_tok), (clip, clip_tok) = encoders
    with torch.no_grad():
        ids = t5_tok(["a red cube"], return_tensors="pt")["input_ids"]  # ▁a ▁red ▁cube </s>
        hidden = t5(input_ids=ids).last_hidden_state[0]
        c_ids = clip_tok(["a red cube"], padding="max_length", max_length=77, return_tensors="pt")
        pooled = clip(**c_ids).pooler_output[0]
    assert ids.shape[1] == 4 and out["mask"][0].tolist() == [True] * 4 + [False] * 4
    assert torch.allclose(out["context"][0, :4], hidden, atol=1e-5)
    assert out["context"][0, 4:].abs().sum() == 0  # padding is zero and masked
    assert torch.allclose(out["pooled"][0], pooled, atol=1e-5)
    assert out["mask"][2].sum() == 1  # the empty prompt is just </s>
    # the pooled vector is CLIP's end-of-text state: it depends on the prompt
    assert not torch.allclose(out["pooled"][0], out["pooled"][1])


def test_cache_hits_skip_the_encoders(encoders, tmp_path):
    cond = _cond(encoders, tmp_path)
    first = cond.encode(["a red cube", "one ball"])
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2

    class Boom:
        def to(self, *a, **k):
            raise AssertionError("encoder called on a cache hit")

    cached = FrozenTextConditioner(t5_modules=(Boom(), None), clip_modules=(Boom(), None), t5_max_length=8,
                                   cache_dir=tmp_path)
    again = cached.encode(["one ball", "a red cube"])
    for k in first:
        assert torch.equal(first[k][0], again[k][1]) and torch.equal(first[k][1], again[k][0])
    # another encoder identity never reads these entries
    other = TextEmbeddingCache(tmp_path, "t5=other:8|clip=x:77|torch.float32")
    assert other.get("a red cube") is None
    assert cond.cache.key("a red cube") != other.key("a red cube")


def test_null_and_duplicates(encoders, tmp_path):
    cond = _cond(encoders, tmp_path, use_cache=False)
    null = cond.null(3)
    ref = cond.encode([""])
    assert null["context"].shape == (3, 8, 16)
    assert torch.equal(null["context"][2], ref["context"][0]) and torch.equal(null["pooled"][1], ref["pooled"][0])
    dup = cond.encode(["a cube", "a cube"])
    assert torch.equal(dup["context"][0], dup["context"][1])
    assert cond.encode(None, n=2)["mask"].shape == (2, 8)


def test_clip_only_context(encoders, tmp_path):
    _, clip = encoders
    cond = FrozenTextConditioner(t5=None, clip_modules=clip, clip_max_length=77, cache_dir=tmp_path)
    out = cond.encode(["a red cube"])
    assert out["context"].shape == (1, 77, 32) and out["mask"][0].sum() == 5  # SOT a red cube EOT


def test_broken_tokenizer_is_a_clear_error():
    class TwoTokens:
        def __len__(self):
            return 2

    with pytest.raises(UserError, match="model.clip_encoder.*2 tokens"):
        check_tokenizer(TwoTokens(), 49408, "openai/clip-vit-large-patch14", "model.clip_encoder")
    check_tokenizer(clip_tokenizer_offline(), 49408, "x", "model.clip_encoder")  # the real one passes


def test_missing_model_is_a_one_line_user_error(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(UserError, match="model.clip_encoder") as err:
        load_clip_text(str(empty))
    assert "\n" not in str(err.value) and "local directory" in str(err.value)
    with pytest.raises(UserError, match="model.t5_encoder"):
        load_t5_encoder(str(empty))


def test_registry_hook_and_mmdit_on_frozen_features(encoders, tmp_path):
    model = MMDiT(sample_size=8, in_channels=3, hidden_size=32, num_heads=2, depth_double=1, depth_single=1,
                  text_encoder="external", context_dim=16, pooled_dim=32, time_freq_dim=32, t5_max_length=8)
    conditioner = make_conditioner(model)
    assert isinstance(conditioner, FrozenTextConditioner) and conditioner.t5_max_length == 8
    assert conditioner.t5_name == "google/t5-v1_1-xxl"
    feats = _cond(encoders, tmp_path).encode(["a red cube", ""])
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.2]), feats)
    assert out.shape == (2, 3, 8, 8)
