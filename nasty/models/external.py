"""The owner's own architectures: ``timm:NAME[:k=v,...]`` and ``torchvision:NAME[:k=v,...]``.

Any classification model of timm (an optional extra: ``pip install 'nasty[timm]'``) or of
torchvision, built with random weights (nothing is ever downloaded: ``pretrained=False`` /
``weights=None``), its classifier sized to the dataset's classes and its first convolution to the
dataset's channels. Options after the name go to the library's constructor
(``timm:resnet10t:drop_rate=0.1``).

The model stays the library's own module, so its state-dict keys are the owner's (``nasty convert
owner.pth --model timm:NAME`` loads a ``model.state_dict()`` saved by the owner's training code),
with nasty's model contract added:

- ``forward_features(x) -> (N, F)``: the pooled features that feed the classifier (timm's
  ``forward_head(..., pre_logits=True)``; for torchvision, the model's own forward with its final
  ``Linear`` skipped), ``forward_head(f) -> logits`` (that ``Linear``), ``num_features`` (F);
- ``stage_names``: the trunk's stages (timm's ``feature_info``; for torchvision ``layer1..4`` of a
  ResNet, else the blocks of ``features`` / ``layers`` / ``trunk_output``);
- ``nasty_spec``, set by the registry, so a checkpoint rebuilds it.

A model whose classifier is not one final ``Linear`` layer (e.g. SqueezeNet's convolutional head,
DeiT's two distillation heads) is refused with one line: nasty can neither size nor split it.
Every model is checked once when built: one forward pass of a single image (on the meta device
when built there) proves that the classifier is the model's last step and that
``forward_head(forward_features(x))`` is the library's own ``forward(x)``.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputShapeError, NastyError
from ._registry import register_model_prefix

TIMM_INSTALL = "pip install 'nasty[timm]'"
# options the dataset or nasty's rules set: weights are never downloaded, classes/channels come from the data
_TIMM_FIXED = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path", "cache_dir",
               "features_only", "num_classes", "in_chans"}
_TV_FIXED = {"weights", "weights_backbone", "pretrained", "progress", "num_classes"}


def _line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:200]}" if s else type(e).__name__


def _unknown(lib: str, name: str, known: list[str]) -> NastyError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(f'{lib}:{c}' for c in close)}?" if close else ""
    return NastyError(f"unknown {lib} model {name!r}{hint} ({len(known)} known: see {lib}'s list_models())")


# options that are probabilities (dropout, stochastic depth): a number in [0, 1], or training fails late
_PROBABILITY = re.compile(r"(^|_)(drop|dropout)(_|$)|_prob$|^p$")


def _check_options(spec: str, kwargs: dict[str, Any], fixed: set[str]) -> None:
    bad = sorted(set(kwargs) & fixed)
    if bad:
        raise NastyError(f"model {spec}: option {bad[0]} is set by nasty (classes and input channels come from the dataset; "
                         "weights are never downloaded: load your own with `nasty convert`)")
    for k, v in sorted(kwargs.items()):
        if _PROBABILITY.search(k) and v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
            raise NastyError(f"model {spec}: option {k} is a probability and must be in [0, 1], got {v!r}")


class _SkippedLinear(nn.Linear):
    """A torchvision classifier left where the library put it (the state-dict keys stay the owner's)
    but skipped by the library's forward, which then returns the pooled features; ``forward_head``
    applies it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _timm_features(self, x: torch.Tensor) -> torch.Tensor:
    base = self._nasty_base
    return base.forward_head(self, base.forward_features(self, x), pre_logits=True)


def _timm_head(self, f: torch.Tensor) -> torch.Tensor:
    return self.get_classifier()(f)


def _tv_features(self, x: torch.Tensor) -> torch.Tensor:
    return self._nasty_base.forward(self, x)  # the classifier is a _SkippedLinear: this is its input


def _tv_head(self, f: torch.Tensor) -> torch.Tensor:
    head = self.get_submodule(self._nasty_head)
    return F.linear(f, head.weight, head.bias)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.forward_head(self.forward_features(x))


_ADAPTED: dict[tuple[type, str], type] = {}


def _adapted_class(cls: type, lib: str) -> type:
    """``cls`` with nasty's contract: a subclass, so the module tree and state-dict keys are unchanged."""
    key = (cls, lib)
    if key not in _ADAPTED:
        feats, head = (_timm_features, _timm_head) if lib == "timm" else (_tv_features, _tv_head)
        _ADAPTED[key] = type(f"Nasty{cls.__name__}", (cls,), {
            "__module__": __name__, "_nasty_base": cls, "forward_features": feats, "forward_head": head, "forward": _forward,
            "__doc__": f"{lib}'s {cls.__name__} with nasty's model contract (forward_features/forward_head/stage_names)."})
    return _ADAPTED[key]


def _dry_run(model: nn.Module, head: nn.Module, spec: str, in_channels: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image through the library's forward: (input, the classifier's input, the model's output).
    Refuses a model that cannot take the input or whose classifier is not its last step."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    # a fixed input from its own generator: building a model consumes no global random numbers beyond the library's
    x = torch.randn(1, in_channels, *image_size, device="meta") if device.type == "meta" else \
        torch.randn(1, in_channels, *image_size, generator=torch.Generator().manual_seed(0)).to(device)
    seen: dict[str, Any] = {}
    hook = head.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise InputShapeError(f"model {spec} cannot take {in_channels}x{image_size[0]}x{image_size[1]} inputs ({_line(e)})") from None
    finally:
        hook.remove()
    if "out" not in seen or out is not seen["out"]:
        raise NastyError(f"model {spec}: its classifier is not the model's last step (something follows it, or it is not used), "
                         "so nasty cannot split it into features and a head")
    return x, seen["inp"], out


def _finish(model: nn.Module, lib: str, head_name: str, head: nn.Linear, stages: list[str], spec: str,
            in_channels: int, image_size: tuple[int, int]) -> nn.Module:
    training = model.training
    model.eval()
    x, feats_in, out = _dry_run(model, head, spec, in_channels, image_size)
    cls = type(model)
    model.__class__ = _adapted_class(cls, lib)
    model._nasty_head = head_name
    if lib == "torchvision":
        head.__class__ = _SkippedLinear
    with torch.no_grad():
        f = model.forward_features(x)
        z = model.forward_head(f)
    if f.shape != (1, head.in_features) or z.shape != out.shape or feats_in.numel() != f.numel():
        raise NastyError(f"model {spec}: its features have shape {tuple(f.shape)}, not (N, {head.in_features}); "
                         "nasty cannot split it into features and a head")
    if not x.is_meta and not (torch.allclose(f, feats_in.reshape(f.shape), atol=1e-5) and torch.allclose(z, out, atol=1e-5)):
        raise NastyError(f"model {spec}: forward_head(forward_features(x)) differs from the library's own forward; "
                         "nasty cannot split it into features and a head")
    model.num_features = head.in_features
    model.stage_names = [s for s in stages if _has(model, s)]
    model.train(training)
    return model


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return bool(name)
    except AttributeError:
        return False


def _linear_head(spec: str, head: Any, num_classes: int) -> nn.Linear:
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        what = type(head).__name__ if isinstance(head, nn.Module) else f"{type(head).__name__} of classifiers"
        raise NastyError(f"model {spec}: its classifier head ({what}) cannot be resized to {num_classes} classes as one "
                         "final Linear layer, which nasty needs (to size it and to put a second head on its features)")
    return head


# ------------------------------------------------------------------------------------------------ timm


def _import_timm():
    try:
        import timm
    except ImportError:
        raise NastyError(f"timm models need timm, which is not installed: {TIMM_INSTALL}") from None
    return timm


def create_timm(name: str, num_classes: int, in_channels: int, image_size: tuple[int, int], **kwargs: Any) -> nn.Module:
    spec = f"timm:{name}"
    if not name:
        raise NastyError("timm: needs a model name, e.g. timm:resnet18 (see timm.list_models())")
    _check_options(spec, kwargs, _TIMM_FIXED)
    timm = _import_timm()
    known = timm.list_models()
    if "." in name and name.partition(".")[0] in known:
        raise NastyError(f"model {spec}: {name.partition('.')[2]!r} is a pretrained-weights tag; nasty builds random weights "
                         f"and never downloads: use timm:{name.partition('.')[0]} (and `nasty convert` for your own weights)")
    if name not in known:
        raise _unknown("timm", name, known)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except NastyError:
        raise
    except Exception as e:
        raise NastyError(f"model {spec}: {_line(e)}") from None
    head = _linear_head(spec, model.get_classifier(), num_classes)
    head_name = next((n for n, m in model.named_modules() if m is head), "")
    stages = [d["module"] for d in getattr(model, "feature_info", []) if isinstance(d, dict) and isinstance(d.get("module"), str)]
    return _finish(model, "timm", head_name, head, stages, spec, in_channels, image_size)


# ------------------------------------------------------------------------------------------------ torchvision


def _tv_names() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)  # the classification models only


def _tv_stages(model: nn.Module) -> list[str]:
    children = dict(model.named_children())
    if all(f"layer{i}" in children for i in (1, 2, 3, 4)):  # ResNet, ResNeXt, Wide ResNet
        return [f"layer{i}" for i in (1, 2, 3, 4)]
    if "stage2" in children:  # ShuffleNetV2
        return [n for n in ("stage2", "stage3", "stage4", "conv5") if n in children]
    for trunk in ("trunk_output", "features", "layers"):  # RegNet; MobileNet, EfficientNet, ConvNeXt, DenseNet, VGG; MNASNet
        t = children.get(trunk)
        if isinstance(t, nn.Sequential) and len(t) > 1:
            return [f"{trunk}.{k}" for k, _ in t.named_children()]
    return [n for n, c in children.items() if n not in ("fc", "classifier", "head", "heads") and any(True for _ in c.parameters())]


@contextlib.contextmanager
def _weights_on_meta():
    """Every parameter and buffer registered inside goes to the meta device at once, while other tensors
    (a constructor's own arithmetic) stay on the default device."""
    reg_param, reg_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        reg_param(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    def register_buffer(self, name, tensor, persistent=True):
        reg_buffer(self, name, tensor, persistent)
        b = self._buffers.get(name)
        if b is not None and not b.is_meta:
            self._buffers[name] = b.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_param, reg_buffer


def create_torchvision(name: str, num_classes: int, in_channels: int, image_size: tuple[int, int], **kwargs: Any) -> nn.Module:
    spec = f"torchvision:{name}"
    if not name:
        raise NastyError("torchvision: needs a model name, e.g. torchvision:resnet18")
    _check_options(spec, kwargs, _TV_FIXED)
    known = _tv_names()
    if name not in known:
        raise _unknown("torchvision", name, known)
    from torchvision import models

    def build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet/Inception's note on their default init
            return models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    try:
        try:
            model = build()
        except NotImplementedError as e:
            if "meta" not in str(e):
                raise
            # RegNet computes its widths with tensors, which the meta device cannot read back: compute on the CPU,
            # but put every parameter and buffer on the meta device as it is registered (nothing is allocated
            # or initialised for real: torchvision:regnet_y_128gf is checked in a second, not in 85 s and 4.85 GB)
            with torch.device("cpu"), _weights_on_meta():
                model = build()
    except Exception as e:
        raise NastyError(f"model {spec}: {_line(e)}") from None
    if getattr(model, "aux_logits", False):
        raise NastyError(f"model {spec} has auxiliary classifiers, which nasty does not train: use {spec}:aux_logits=False")
    if getattr(model, "transform_input", False) and in_channels != 3:
        raise NastyError(f"model {spec}: transform_input needs 3 channels; use {spec}:transform_input=False")
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        last = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
        what = f"{last[0][0]} is a {type(last[0][1]).__name__}" if last else "no Linear layer"
        raise NastyError(f"model {spec}: its classifier head cannot be resized as one final Linear layer ({what}), "
                         "which nasty needs (to size it and to put a second head on its features)")
    head_name, head = heads[-1]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[0][1].in_channels != in_channels:
        cname, conv = convs[0]
        if conv.groups != 1:
            raise NastyError(f"model {spec}: its first convolution {cname} is grouped; nasty cannot give it {in_channels} input channels")
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                        bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        parent, _, leaf = cname.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return _finish(model, "torchvision", head_name, head, _tv_stages(model), spec, in_channels, image_size)


register_model_prefix("timm", create_timm, f"any timm classifier, random init: timm:NAME[:k=v,...] (e.g. timm:resnet18; {TIMM_INSTALL})")
register_model_prefix("torchvision", create_torchvision,
                      "any torchvision classifier, random init: torchvision:NAME[:k=v,...] (e.g. torchvision:resnet18)")
