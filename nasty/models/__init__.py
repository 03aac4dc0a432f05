"""Model registry, timm style: ``@register_model``, ``create_model``, ``list_models``.

Every model takes ``num_classes``, ``in_channels`` and ``image_size`` (8x8 to 64x64, 1 or 3
channels) plus its own width options, and exposes ``stage_names``: the submodules whose outputs
are its intermediate stages (used by feature distillation and auxiliary heads).
``timm:NAME`` and ``torchvision:NAME`` specs build those libraries' models with the same contract
(models/external.py; ``model_prefixes()`` lists the prefixes).
"""

from ._registry import create_model, list_models, model_doc, model_prefixes, model_spec, parse_model_spec, register_model

from ..registry import import_all

import_all(__name__, __path__)  # every model file registers its models: a new model is one new file

__all__ = ["create_model", "list_models", "model_doc", "model_prefixes", "model_spec", "parse_model_spec", "register_model"]
