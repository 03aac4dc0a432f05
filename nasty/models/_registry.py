"""The model registry (timm's ``_registry.py``): ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import ast
import re
import inspect
from typing import Any, Callable

import torch.nn as nn

from ..errors import NastyError
from ..registry import Registry

_MODELS = Registry("model")
# Model libraries addressed as ``PREFIX:NAME[:k=v,...]`` (``timm:resnet18``): prefix -> (factory, one-line doc).
# The factory takes (name, num_classes, in_channels, image_size, **kwargs); models/external.py registers them.
_PREFIXES: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def register_model_prefix(prefix: str, factory: Callable[..., nn.Module], doc: str) -> None:
    """Route ``PREFIX:NAME`` specs to ``factory`` (a whole model library behind one prefix)."""
    _PREFIXES[prefix] = (factory, doc)


def model_prefixes() -> dict[str, str]:
    """``{"timm": "...", "torchvision": "..."}``: the model libraries reachable as ``PREFIX:NAME``."""
    return {k: doc for k, (_, doc) in sorted(_PREFIXES.items())}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name (``_`` becomes ``-``)."""
    return _MODELS.register(fn, fn.__name__.replace("_", "-"))


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_doc(name: str) -> str:
    return (inspect.getdoc(_MODELS[name]) or "").splitlines()[0]


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cnn:width=0.25"`` -> ``("cnn", {"width": 0.25})``. Values are Python literals."""
    name, _, rest = spec.partition(":")
    if name.strip() in _PREFIXES:  # "timm:resnet18:drop_rate=0.1" -> ("timm:resnet18", {"drop_rate": 0.1})
        sub, _, rest = rest.partition(":")
        name = f"{name.strip()}:{sub.strip()}"
    kwargs: dict[str, Any] = {}
    for part in filter(None, re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest)):
        key, eq, value = part.partition("=")
        if not eq:
            raise NastyError(f"model option {part!r} in {spec!r} is not KEY=VALUE")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name.strip(), kwargs


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int | tuple[int, int] = 32, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``name`` may carry options: ``"cnn:width=0.5"``."""
    base, spec_kwargs = parse_model_spec(name)
    kwargs = {**spec_kwargs, **kwargs}
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    prefix, colon, library_name = base.partition(":")
    external = bool(colon) and prefix in _PREFIXES
    fn = _PREFIXES[prefix][0] if external else _MODELS.lookup(base)
    if in_channels not in (1, 3) or not all(4 <= s <= 256 for s in image_size):
        raise NastyError(f"model {base}: unsupported input {in_channels}x{image_size[0]}x{image_size[1]}")
    if external:  # timm:NAME, torchvision:NAME (models/external.py checks the options)
        model = fn(library_name, num_classes, in_channels, tuple(image_size), **kwargs)
        model.nasty_spec = {"name": base, "kwargs": kwargs}  # type: ignore[attr-defined]
        return model
    allowed = set(inspect.signature(fn).parameters) - {"num_classes", "in_channels", "image_size"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise NastyError(f"model {base} has no option {', '.join(sorted(unknown))} (options: {', '.join(sorted(allowed)) or 'none'})")
    try:
        model = fn(num_classes=num_classes, in_channels=in_channels, image_size=tuple(image_size), **kwargs)
    except (TypeError, ValueError) as e:
        raise NastyError(f"model {base}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    model.nasty_spec = {"name": base, "kwargs": kwargs}  # type: ignore[attr-defined]
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "nasty_spec"))

