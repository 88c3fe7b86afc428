"""The CLIP BPE tokenizer (offline), the tiny trainable text encoder and the text Conditioner."""

from __future__ import annotations

import time

import pytest
import torch

from selfe_cli.models.conditioning import Conditioner, cond_cat
from selfe_cli.models.text import (
    EOT_TOKEN,
    SOT_TOKEN,
    VOCAB_SIZE,
    TextConditioner,
    TinyTextEncoder,
    eot_positions,
    get_tokenizer,
    null_input_ids,
    tokenize,
)

pytestmark = pytest.mark.usefixtures("small_nets")


def test_tokenizer_is_the_real_clip_bpe_offline() -> None:
    tok = get_tokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert get_tokenizer() is tok  # cached
    ids = tokenize(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    # SOT, 5 word tokens, EOT, padding
    assert ids[0, 0] == SOT_TOKEN and ids[0, 6] == EOT_TOKEN and (ids[0, 7:] == 0).all()
    assert tok.decode(ids[0, 1:6].tolist()).strip() == "a photo of a cat"


def test_empty_prompt_is_the_null_tokens() -> None:
    assert torch.equal(tokenize([""]), null_input_ids(1))
    assert null_input_ids(3)[:, :2].tolist() == [[SOT_TOKEN, EOT_TOKEN]] * 3


def test_long_prompts_are_cut_and_end_with_eot() -> None:
    ids = tokenize(["word " * 200])
    assert ids.shape == (1, 77) and ids[0, -1] == EOT_TOKEN
    assert eot_positions(ids).item() == 76


def test_tokenization_is_fast() -> None:
    captions = [f"a photo of {i} red cubes left of a blue sphere" for i in range(512)]
    tokenize(captions[:4])
    start = time.perf_counter()
    tokenize(captions)
    assert time.perf_counter() - start < 1.0


def test_eot_positions() -> None:
    ids = torch.tensor([[SOT_TOKEN, 5, EOT_TOKEN, 0], [SOT_TOKEN, EOT_TOKEN, 0, 0], [SOT_TOKEN, 1, 2, 3]])
    assert eot_positions(ids).tolist() == [2, 1, 3]


def test_tiny_encoder_outputs() -> None:
    enc = TinyTextEncoder(width=32, layers=2, heads=4)
    ids = tokenize(["a red cube", ""])
    context, mask, pooled = enc(ids)
    # the padding after the longest prompt (5 tokens) is trimmed
    assert context.shape == (2, 5, 32) and mask.shape == (2, 5) and pooled.shape == (2, 32)
    assert mask.dtype == torch.bool
    assert mask[0].sum() == 5 and mask[1].sum() == 2  # SOT, 3 words, EOT / SOT, EOT
    assert torch.equal(pooled[0], context[0, 4]) and torch.equal(pooled[1], context[1, 1])
    assert not torch.allclose(pooled[0], pooled[1])


def test_tiny_encoder_is_causal_padding_never_leaks() -> None:
    enc = TinyTextEncoder(width=32, layers=2, heads=4)
    ids = tokenize(["a red cube"])
    other = ids.clone()
    other[0, 10:] = 123  # garbage after EOT
    c1, _, p1 = enc(ids)
    c2, _, p2 = enc(other)
    assert torch.allclose(p1, p2) and torch.allclose(c1[:, :5], c2[:, :5])
    changed = ids.clone()
    changed[0, 2] = 999  # a token before EOT does change the pooled vector
    assert not torch.allclose(enc(changed)[2], p1)


def test_trimming_the_padding_is_exact() -> None:
    enc = TinyTextEncoder(width=32, layers=2, heads=4).double()
    ids = tokenize(["a red cube and a blue sphere", "", "two cubes"])
    trimmed = enc(ids)
    enc.trim = False
    full = enc(ids)
    assert trimmed[0].shape[1] == 9 and full[0].shape[1] == 77
    torch.testing.assert_close(trimmed[2], full[2], rtol=1e-12, atol=1e-12)  # pooled
    torch.testing.assert_close(trimmed[0], full[0][:, :9], rtol=1e-12, atol=1e-12)
    assert torch.equal(trimmed[1], full[1][:, :9]) and not full[1][:, 9:].any()


def test_text_conditioner() -> None:
    cond = TextConditioner()
    assert isinstance(cond, Conditioner) and cond.kind == "text"
    batch = {"image": torch.zeros(2, 3, 8, 8), "caption": ["one", "two words"]}
    c = cond.from_batch(batch)
    assert c["input_ids"].shape == (2, 77)
    assert torch.equal(c["input_ids"], cond.encode(["one", "two words"])["input_ids"])
    null = cond.null(3)
    assert torch.equal(null["input_ids"], tokenize(["", "", ""]))
    assert cond.encode(None, n=2)["input_ids"].shape == (2, 77)
    assert cond_cat(c, cond.null(2))["input_ids"].shape == (4, 77)
    with pytest.raises(KeyError, match="caption"):
        cond.from_batch({"image": torch.zeros(1)})
