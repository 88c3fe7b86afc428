"""Registry: names, schemas, paper parameter counts, strict loading, conditioners."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file

from selfe_cli.config import ConfigError
from selfe_cli.errors import UserError
from selfe_cli.models import (
    MODEL_CLASSES,
    MODELS,
    ClassConditioner,
    Conditioner,
    DiT,
    TextConditioner,
    TwoTimeModel,
    UNet,
    build_model,
    count_parameters,
    load_model,
    make_conditioner,
    model_schema,
    register_model,
    register_text_conditioner,
    registry,
    validate_model_kwargs,
)

pytestmark = pytest.mark.usefixtures("small_nets")

DIT_NAMES = [f"DiT-{s}/{p}" for s in ("S", "B", "M", "L", "XL") for p in (2, 4, 8)] + ["DiT-tiny/2", "DiT-tiny/4"]


def test_registry_names() -> None:
    for name in [*DIT_NAMES, "unet", "unet-ddpmpp-cifar10", "dit"]:
        assert name in MODELS
    assert registry.DiT_XL_2 is MODELS["DiT-XL/2"]


@pytest.mark.parametrize("name", sorted(n for n in MODELS if n.startswith(("DiT", "unet", "dit"))))
def test_every_entry_builds_and_keeps_shape_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name)
        n, s = 2, model.sample_size
        x = torch.empty(n, model.in_channels, s, s)
        out = model(x, torch.rand(n), torch.zeros(n))
    assert out.shape == x.shape and isinstance(model, TwoTimeModel)


@pytest.mark.parametrize("name", ["unet", "DiT-tiny/2", "DiT-tiny/4"])
def test_cheap_entries_run_on_cpu(name: str) -> None:
    model = build_model(name, sample_size=16)
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.rand(2), torch.zeros(2)).shape == x.shape
    assert count_parameters(model) < 5e6  # small enough for CPU training


@pytest.mark.parametrize("name, expected", [
    ("DiT-B/2", 131e6), ("DiT-L/2", 459e6), ("DiT-XL/2", 676e6),  # MF Table 4, ImageNet 256 (4x32x32, 1000 classes)
])
def test_dit_paper_parameter_counts(name: str, expected: float) -> None:
    with torch.device("meta"):
        model = build_model(name, condition="class", num_classes=1000)
    assert model.in_channels == 4 and model.sample_size == 32
    assert abs(count_parameters(model) / expected - 1) < 0.01


def test_dit_widths_and_heads() -> None:
    with torch.device("meta"):
        for name, (depth, width, heads) in {"DiT-B/4": (12, 768, 12), "DiT-M/2": (16, 1024, 16),
                                            "DiT-L/8": (24, 1024, 16), "DiT-XL/2": (28, 1152, 16)}.items():
            model = build_model(name)
            assert len(model.blocks) == depth and model.config.hidden_size == width
            assert model.blocks[0].attn.num_heads == heads


def test_ddpmpp_cifar10_parameter_count() -> None:
    with torch.device("meta"):
        model = build_model("unet-ddpmpp-cifar10")
    assert abs(count_parameters(model) / 55e6 - 1) < 0.03  # MeanFlow's ~55M CIFAR-10 U-Net
    assert model.config.dropout == 0.2 and model.sample_size == 32 and model.in_channels == 3


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(UserError, match="did you mean 'DiT-B/2'"):
        build_model("DiT-B2")
    with pytest.raises(UserError, match="unknown model name"):
        model_schema("resnet")


def test_model_schema_hides_fixed_and_shows_defaults() -> None:
    schema = model_schema("DiT-B/2")
    assert "depth" not in schema and "hidden_size" not in schema and "patch_size" not in schema
    assert schema["in_channels"] == (int, 4)
    assert schema["qk_norm"] == (bool, False)
    cifar = model_schema("unet-ddpmpp-cifar10")
    assert cifar["dropout"] == (float, 0.2) and "channel_mult" not in cifar
    assert "depth" in model_schema("dit")


def test_validate_model_kwargs() -> None:
    out = validate_model_kwargs("unet", {"channel_mult": [1, 2], "dropout": 0.1})
    assert out == {"channel_mult": (1, 2), "dropout": 0.1}
    with pytest.raises(ConfigError, match="model.dropuot: unknown key; did you mean 'dropout'"):
        validate_model_kwargs("unet", {"dropuot": 0.1})
    with pytest.raises(ConfigError, match="model.condition: expected one of"):
        validate_model_kwargs("DiT-B/2", {"condition": "label"})
    with pytest.raises(ConfigError, match="model.depth: unknown key"):
        validate_model_kwargs("DiT-B/2", {"depth": 6})


def test_build_model_errors_are_one_line_user_errors() -> None:
    with pytest.raises(ConfigError, match="model.depth: fixed to 12 by the preset 'DiT-B/2'"):
        build_model("DiT-B/2", depth=6)
    with pytest.raises(UserError, match="not divisible by num_heads") as err:
        build_model("dit", hidden_size=30, num_heads=4)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="num_classes"):
        build_model("DiT-tiny/4", condition="class")
    model = build_model("unet", channel_mult=[1, 2], sample_size=8)  # YAML lists are accepted
    assert model.config.channel_mult == (1, 2) or list(model.config.channel_mult) == [1, 2]


def test_register_model_one_line_and_decorator() -> None:
    class Toy(TwoTimeModel):
        @register_to_config
        def __init__(self, sample_size: int = 4, in_channels: int = 1, scale: float = 2.0):
            super().__init__()
            self.cond_kind, self.in_channels, self.sample_size = "none", in_channels, sample_size
            self.w = torch.nn.Parameter(torch.tensor(scale))

        def forward(self, x, t, r, cond=None):
            return self.w * x

    try:
        register_model("toy", Toy)
        register_model("toy-3", Toy, fixed=dict(scale=3.0))
        assert build_model("toy").w.item() == 2.0 and build_model("toy-3").w.item() == 3.0
        assert "scale" not in model_schema("toy-3")
        with pytest.raises(ValueError, match="already registered"):
            register_model("toy", Toy)

        @register_model("toy-fn")
        def toy_fn(scale: float = 5.0):  # no return hint: a local class would not resolve
            return Toy(scale=scale)

        assert build_model("toy-fn", scale=1).w.item() == 1.0
        assert model_schema("toy-fn") == {"scale": (float, 5.0)}
    finally:
        for name in ("toy", "toy-3", "toy-fn"):
            MODELS.pop(name, None)
        MODEL_CLASSES.pop("Toy", None)


def _save_small(tmp_path):
    model = DiT(sample_size=8, in_channels=2, hidden_size=32, depth=1, num_heads=2)
    model.save_pretrained(tmp_path)
    return model


def test_load_model_accepts_config_path(tmp_path) -> None:
    model = _save_small(tmp_path)
    loaded = load_model(tmp_path / "config.json")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_load_model_is_strict_about_unexpected_keys(tmp_path) -> None:
    _save_small(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["extra.weight"] = torch.zeros(3)
    save_file(state, weights)
    with pytest.raises(UserError, match="unexpected keys"):
        load_model(tmp_path)


def test_load_model_is_strict_about_missing_keys(tmp_path) -> None:
    _save_small(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["final_layer.linear.weight"]
    save_file(state, weights)
    with pytest.raises(UserError, match="missing keys"):
        load_model(tmp_path)


def test_load_model_rejects_shape_mismatch(tmp_path) -> None:
    _save_small(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_ratio"] = 2.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=str(tmp_path)):
        load_model(tmp_path)


def test_load_model_bad_paths_and_classes(tmp_path) -> None:
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "DiTT"}))
    with pytest.raises(UserError, match="did you mean 'DiT'"):
        load_model(tmp_path)


def test_make_conditioner() -> None:
    plain = make_conditioner(UNet(sample_size=8, channel_mult=(1, 2)))
    assert type(plain) is Conditioner and plain.null(3) is None
    labels = make_conditioner(DiT(sample_size=8, hidden_size=32, depth=1, num_heads=2, condition="class",
                                  num_classes=3), {"num_classes": 3, "class_names": ["a", "b", "c"]})
    assert isinstance(labels, ClassConditioner) and labels.null(2).tolist() == [3, 3]
    assert labels.encode(["b", 2]).tolist() == [1, 2]
    with pytest.raises(UserError, match="num_classes is 3 but the dataset has 10"):
        make_conditioner(DiT(sample_size=8, hidden_size=32, depth=1, num_heads=2, condition="class",
                             num_classes=3), {"num_classes": 10})
    text = DiT(sample_size=8, hidden_size=32, depth=1, num_heads=2, condition="text", text_width=16,
               text_layers=1, text_heads=2)
    assert isinstance(make_conditioner(text), TextConditioner)
    external = DiT(sample_size=8, hidden_size=32, depth=1, num_heads=2, condition="text",
                   text_encoder="external", context_dim=4, pooled_dim=4)
    saved = registry.TEXT_CONDITIONERS.pop("external", None)  # the frozen-encoder module may have set one
    try:
        with pytest.raises(UserError, match="no conditioner is registered for 'external'"):
            make_conditioner(external)
        register_text_conditioner("external", lambda model, info: Conditioner())
        assert type(make_conditioner(external)) is Conditioner
    finally:
        registry.TEXT_CONDITIONERS.pop("external", None)
        if saved is not None:
            registry.TEXT_CONDITIONERS["external"] = saved
