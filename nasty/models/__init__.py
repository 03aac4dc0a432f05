"""Model registry, timm style: ``@register_model``, ``create_model``, ``list_models``.

Every model takes ``num_classes``, ``in_channels`` and ``image_size`` (8x8 to 64x64, 1 or 3
channels) plus its own width options, and exposes ``stage_names``: the submodules whose outputs
are its intermediate stages (used by feature distillation and auxiliary heads).
``timm:NAME`` and ``torchvision:NAME`` specs build those libraries' models with the same contract
(models/external.py; ``model_prefixes()`` lists the prefixes).
"""

from ._registry import create_model, list_models, model_doc, model_prefixes, model_spec, parse_model_spec, register_model

# Importing a model file registers its models.
from . import cnn, external, locked, mlp, mobilenetv2, resnet, shufflenetv2  # noqa: E402,F401

__all__ = ["create_model", "list_models", "model_doc", "model_prefixes", "model_spec", "parse_model_spec", "register_model"]
