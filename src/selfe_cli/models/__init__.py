"""Two-time networks ``net(x, t, r, cond)`` (U-Net, DiT, ...), their registry and the built-in text encoder."""

from selfe_cli.models.base import MODEL_CLASSES, ConditionEmbedder, TwoTimeModel
from selfe_cli.models.conditioning import ClassConditioner, Cond, Conditioner
from selfe_cli.models.dit import DiT
from selfe_cli.models.embeddings import attention_backend, timestep_embedding
from selfe_cli.models.registry import (
    MODELS,
    build_model,
    count_parameters,
    load_model,
    make_conditioner,
    model_schema,
    register_model,
    register_text_conditioner,
    validate_model_kwargs,
)
from selfe_cli.models.text import TextConditioner, TinyTextEncoder, tokenize
from selfe_cli.models.unet import UNet

__all__ = [
    "MODELS", "MODEL_CLASSES", "ClassConditioner", "Cond", "ConditionEmbedder", "Conditioner", "DiT",
    "TextConditioner", "TinyTextEncoder", "TwoTimeModel", "UNet", "attention_backend", "build_model",
    "count_parameters", "load_model", "make_conditioner", "model_schema", "register_model",
    "register_text_conditioner", "timestep_embedding", "tokenize", "validate_model_kwargs",
]
