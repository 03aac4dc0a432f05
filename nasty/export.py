"""``nasty export``: one file that serves a checkpoint *with its whole defense*, for ONNX Runtime
(or any ONNX server) or TorchScript, without nasty.

The exported graph is what nasty serves: input ``images``, float32 ``(N, C, H, W)`` pixels in
``[0, 1]`` (the dataset's images before normalisation: uint8 / 255, digits / 16), normalised inside
the graph with the checkpoint's mean/std; the model (a decision-locked teacher keeps its lock: the
nasty logits with the normal model's decision on top); softmax; then the ``--output-defense`` chain.
Output ``probabilities``, float32 ``(N, classes)``: the defended probabilities a client receives,
the same numbers as ``DefendedModel(model, spec).probabilities(x)`` (softmax of the model when no
output defense is given). The batch size is dynamic.

The lock is the model's own forward, :func:`nasty.models.served.serve` (written with graph-exportable
operations only: the file computes what nasty serves). The output defenses are re-expressed here
with graph-exportable operations (no data-dependent Python branches), each the same function as its
eager counterpart in nasty/defenses/output.py (tests/test_export.py compares them through ONNX
Runtime on every test image). A random output defense (``noise``) cannot be one fixed graph and is
refused, as is any output defense without an exportable form: one line naming it. After a locked
teacher, an output defense that can move its decision is refused by name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import click
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import safe_io
from .checkpoint import SIDECAR, WEIGHTS, load_checkpoint, read_sidecar
from .defenses.output import DefendedModel, check_after_lock, parse_output_defense
from .errors import NastyError, error_line
from .models.locked import LockedTeacher

FORMATS = ("onnx", "torchscript")
ONNX_INSTALL = "pip install 'nasty[onnx]'"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


# ------------------------------------------------------------------------------------------------
# graph-exportable forms of the lock and of the output defenses


def _onehot_argmax(p: torch.Tensor) -> torch.Tensor:
    """One-hot of each row's argmax (the first maximum, as torch.argmax and ONNX ArgMax)."""
    return torch.zeros_like(p).scatter(1, p.argmax(1, keepdim=True), 1.0)


def _renormalise(q: torch.Tensor, fallback_from: torch.Tensor) -> torch.Tensor:
    """Rows of ``q`` scaled to sum 1; a row with no mass becomes the one-hot of ``fallback_from``'s argmax."""
    s = q.sum(1, keepdim=True)
    return torch.where(s > 0, q / torch.where(s > 0, s, torch.ones_like(s)), _onehot_argmax(fallback_from))


def _topk(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(p):
        top = p.topk(min(k, p.shape[1]), dim=1)
        return _renormalise(torch.zeros_like(p).scatter(1, top.indices, top.values), p)
    return f


def _round(decimals: int) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = 10.0**decimals

    def f(p):
        q = torch.round(p * scale) / scale
        top = p.argmax(1, keepdim=True)
        others = q.scatter(1, top, float("-inf")).amax(1, keepdim=True)
        return q.scatter(1, top, torch.maximum(q.gather(1, top).clamp_min(1.0 / scale), others + 1.0 / scale))
    return f


def _label() -> Callable[[torch.Tensor], torch.Tensor]:
    return _onehot_argmax


def _reverse_sigmoid(beta: float, gamma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(p):
        eps = 1e-9
        pc = p.clamp(eps, 1 - eps)
        r = beta * (torch.sigmoid(gamma * torch.log(pc / (1 - pc))) - 0.5)
        return _renormalise((p - r).clamp(0.0, 1.0), p)
    return f


def _cutoff(threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(p):
        keep = (p >= threshold) | (_onehot_argmax(p) > 0)
        return torch.where(keep, p, torch.zeros_like(p))
    return f


def _template(top: float, decoy: float, shift: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(p):
        c = p.shape[1]
        d = p.argmax(1, keepdim=True)
        decoy_class = (d + (shift % (c - 1) or 1)) % c
        rest = (1.0 - top - decoy) / (c - 2) if c > 2 else 0.0
        out = torch.full_like(p, rest)
        return out.scatter(1, decoy_class, decoy if c > 2 else 1.0 - top).scatter(1, d, top)
    return f


# output defense name -> its exportable form, built from the defense's validated parameters
_EXPORTABLE: dict[str, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {
    "topk": _topk, "round": _round, "label": _label, "reverse-sigmoid": _reverse_sigmoid, "cutoff": _cutoff, "template": _template,
}
_WHY_NOT = {"noise": "it is random (a fresh draw per query), which one fixed graph cannot reproduce"}


def _part_names(spec: str | None) -> list[str]:
    """Each part of an ``--output-defense`` chain as it describes itself (``reverse-sigmoid:beta=...``)."""
    if spec is None:
        return []
    return [part.describe() if hasattr(part, "describe") else getattr(part, "name", type(part).__name__)
            for part in parse_output_defense(spec).parts]


def exportable_output_defense(spec: str | None) -> tuple[list[Callable[[torch.Tensor], torch.Tensor]], str | None]:
    """The exportable forms of an ``--output-defense`` chain, left to right, and its canonical spec.
    Raises a one-line :class:`NastyError` naming the first part that cannot be exported."""
    if spec is None:
        return [], None

    chain = parse_output_defense(spec)
    parts = []
    for part in chain.parts:
        name = getattr(part, "name", type(part).__name__)
        if name not in _EXPORTABLE:
            why = _WHY_NOT.get(name, "it has no exportable form")
            raise NastyError(f"output defense {part.describe() if hasattr(part, 'describe') else name} cannot be exported: {why}")
        parts.append(_EXPORTABLE[name](**part.p))
    return parts, chain.describe()


class ServedModel(nn.Module):
    """What nasty serves, as one graph: normalise, the model (its decision lock included), softmax,
    the output defenses. ``forward(images in [0, 1]) -> probabilities``."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float],
                 defenses: list[Callable[[torch.Tensor], torch.Tensor]] | None = None):
        super().__init__()

        self.model = model.eval()
        self.locked = isinstance(model, LockedTeacher)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.defenses = list(defenses or [])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # a locked teacher's forward is the one served function, graph-exportable as it is

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = F.softmax(self.logits((images - self.mean) / self.std), dim=1)
        for part in self.defenses:
            p = part(p)
        return p

    def decisions(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own decisions for ``images`` in [0, 1]: the undefended argmax (of a locked model,
        its decision model's), before any lock or output defense."""
        with torch.no_grad():
            x = (images - self.mean) / self.std
            if self.locked:
                return self.model.decide_and_serve(x)[0].argmax(1)
            return self.model(x).argmax(1)


def decision_served(p: torch.Tensor, decisions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of served probabilities ``p``: ``moved`` when the model's decision is not among the row's
    maxima or the row is constant (it carries no decision at all); ``tied`` when the decision is among
    maxima shared with another class (a client's argmax may read the other one)."""
    top = p.max(1).values
    among = p.gather(1, decisions[:, None])[:, 0] >= top
    constant = p.min(1).values >= top
    moved = ~among | constant
    tied = among & ~constant & ((p >= top[:, None]).sum(1) > 1)
    return moved, tied


def check_keeps_decisions(served: ServedModel, names: list[str], images: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """Refuse (one line, exit 2) a served chain that changes the model's decision on any of ``images``,
    naming the first step that does (the lock, or an output defense of ``names``): a defended file may
    hide probabilities, never serve other decisions than the model's. Returns the model's decisions and
    a warning when a step ties the decision with another class (rounding can) without moving it.
    The one check of what an exported file decides: on PyTorch's copy of the chain before the file is
    written, and (:func:`check_file_decisions`) on the written file itself (:func:`export_model`)."""
    d = served.decisions(images)
    warning = None
    with torch.no_grad():
        p = F.softmax(served.logits((images - served.mean) / served.std), dim=1)
        steps = [("the decision lock", None), *[(f"output defense {n}", part) for n, part in zip(names, served.defenses)]]
        for what, part in steps:
            if part is not None:
                p = part(p)
            moved, tied = decision_served(p, d)
            if moved.any():
                raise NastyError(f"{what} changes the model's decision on {int(moved.sum())} of {len(d)} checked images; refused: "
                                 "a defended file may hide probabilities, never serve other decisions than the model's")
            if tied.any() and warning is None:
                warning = (f"{what} ties the model's decision with another class on {int(tied.sum())} of {len(d)} checked "
                           "images (exported anyway: the decision is among the top; a client's argmax may read the other class)")
    return d, warning


def check_file_decisions(got: torch.Tensor, decisions: torch.Tensor, what: str) -> None:
    moved, _ = decision_served(got, decisions)
    if moved.any():
        raise NastyError(f"{what} changes the model's decision on {int(moved.sum())} of {len(decisions)} checked images; refused")


# ------------------------------------------------------------------------------------------------
# writing the file


@contextlib.contextmanager
def _quiet_fds(log: list[str]):
    """Silence file descriptors 1 and 2 (the TorchScript exporter prints its graph there from C++ on
    failure, which would break the one-line error contract); what was written is appended to ``log``."""

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    saved = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        except OSError:  # no real descriptors (an embedding host): nothing to silence
            pass
        try:
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
                yield
        finally:
            for fd, dup in saved:
                os.dup2(dup, fd)
                os.close(dup)
            sink.seek(0)
            log.append(sink.read().decode("utf-8", "replace") + out.getvalue() + err.getvalue())


def _failure(e: BaseException, log: str) -> str:
    """The exporter's error in one line, naming the operator and, from the graph it printed, the module."""

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = next((ln for ln in lines if "aten::" in ln or "aten." in ln or "not supported" in ln.lower()), lines[0] if lines else "")
    op = re.search(r"(aten::\w+)", text)
    where = ""
    if op:
        node = next((ln for ln in log.splitlines() if f"= {op.group(1)}(" in ln), "")
        scope = re.search(r"scope: (\S+)", node)
        if scope and "/" in scope.group(1):  # "nasty.export.ServedModel::/pkg.Net::model/pkg.Odd::model.odd": the innermost module
            cls, _, name = scope.group(1).split("/")[-1].rpartition("::")
            cls = cls.rpartition(".")[2]
            where = f" in the model's own forward ({cls})" if name == "model" else f" in module {name.removeprefix('model.')} ({cls})"
    return f"{type(e).__name__}: {text[:300]}{where}"


def _export_onnx(served: nn.Module, example: torch.Tensor, path: str) -> None:
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
    except ImportError:
        raise NastyError(f"ONNX export needs onnx: {ONNX_INSTALL}") from None
    # The TorchScript-based exporter (dynamo=False): it works offline with torch and onnx alone,
    # takes dynamic_axes for the batch, handles every op the served graph uses (gather/scatter,
    # topk, argmax, round), and writes the weights inside the one .onnx file, in 0.05 s for the
    # digits models. The dynamo exporter (torch's default) gives the same numbers here but also
    # needs onnxscript, takes 5 s and prints its progress on stdout.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(served, (example,), path, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=17)


def _export_torchscript(served: nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(served, (example,), check_trace=False)
        traced.save(path)


def export_model(model: nn.Module, side: dict, out: str | Path, fmt: str = "onnx", output_defense: str | None = None) -> dict:
    """Write ``model`` (a loaded checkpoint and its sidecar) with its served defense to ``out``
    atomically (a failed export leaves no file). Returns facts about the file for the CLI."""
    if fmt not in FORMATS:
        raise NastyError(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    defenses, described = exportable_output_defense(output_defense)
    if output_defense is not None and isinstance(model, LockedTeacher):
        check_after_lock(parse_output_defense(output_defense), model.num_classes)
    norm = side["normalization"]
    served = ServedModel(model, norm["mean"], norm["std"], defenses).eval()
    c, h, w = side["input_shape"]
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    images = check_images(side)
    decisions, warning = check_keeps_decisions(served, _part_names(output_defense), images)  # before anything is written
    out = Path(out)
    log: list[str] = []

    def produce(tmp: str) -> None:
        with _quiet_fds(log):
            (_export_onnx if fmt == "onnx" else _export_torchscript)(served, example, tmp)
        got = run_exported(tmp, images, fmt)  # the file itself, before it replaces anything
        if got is not None:
            check_file_decisions(got, decisions, f"the exported {fmt} file")

    safe_io.write_with(out, produce, lambda e: NastyError(f"cannot export {side['model']['name']} to {fmt}: {_failure(e, ''.join(log))}"))
    return {"file": str(out), "format": fmt, "bytes": out.stat().st_size, "model": side["model"]["name"],
            "output_defense": described, "input": {"name": INPUT_NAME, "shape": ["batch", c, h, w], "range": [0.0, 1.0]},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", side["num_classes"]], "what": "defended probabilities"},
            "classes": list(side["classes"]), "normalization": norm, "warning": warning}


def reference_probabilities(model: nn.Module, side: dict, x: torch.Tensor, output_defense: str | None = None) -> torch.Tensor:
    """What nasty itself serves for images ``x`` in [0, 1], in eager PyTorch: the model's own forward
    (its served function), softmax and the output defenses of nasty/defenses/output.py."""

    norm = side["normalization"]
    mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1)
    xn = (x - mean) / std
    with torch.no_grad():
        if output_defense:
            return DefendedModel(model.eval(), output_defense).probabilities(xn)
        return F.softmax(model.eval()(xn), dim=1)


def run_exported(path: str | Path, x: torch.Tensor, fmt: str = "onnx") -> torch.Tensor | None:
    """The exported file's output for ``x`` (ONNX Runtime or torch.jit); ``None`` without onnxruntime."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14
        return torch.jit.load(str(path))(x)


def check_images(side: dict, n: int = 64) -> torch.Tensor:
    """The fixed images an export is checked on (seeded uniform pixels of the checkpoint's input shape)."""
    c, h, w = side["input_shape"]
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(1))


def compare(got: torch.Tensor, ref: torch.Tensor, decisions: torch.Tensor | None = None) -> dict:
    """``max_abs_diff``: the file against PyTorch's copy of the chain; ``argmax_agreement``: the share of
    images on which the file serves the model's own decision (``decisions``; PyTorch's argmax when not
    given) among its top classes (``ties``: how many of those share the top with another class)."""
    d = ref.argmax(1) if decisions is None else decisions
    moved, tied = decision_served(got, d)
    return {"images": int(ref.shape[0]), "max_abs_diff": float((got - ref).abs().max()),
            "argmax_agreement": float((~moved).float().mean()), "ties": int(tied.sum())}


# ------------------------------------------------------------------------------------------------
# the command


@click.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", default="onnx", show_default=True,
              help="onnx (ONNX Runtime or any ONNX server; needs the onnx extra) or torchscript (torch.jit.load).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The file to write (e.g. model.onnx).")
@click.option("--output-defense", help="Output defense chain served after softmax and built into the file, e.g. topk:2,round:3 "
                                       "(random ones such as noise cannot be exported).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout at the end.")
def export_cmd(checkpoint: str, fmt: str, out: str, output_defense: str | None, force: bool, as_json: bool) -> None:
    """Export a checkpoint with its whole served defense (decision lock, output defenses) to one file.

    The file maps images (float32, N x C x H x W, pixels in [0, 1] before normalisation) to the
    probabilities nasty serves: normalisation, the model with its lock, softmax, the output defenses.
    """
    try:
        _export(checkpoint, fmt, out, output_defense, force, as_json)
    except NastyError as e:  # the CLI's convention, also when this command runs on its own: one line, its exit code
        click.echo(f"error: {error_line(e)}", err=True)
        raise click.exceptions.Exit(e.exit_code) from None


def _export(checkpoint: str, fmt: str, out: str, output_defense: str | None, force: bool, as_json: bool) -> None:

    # every check before any work: format, output file, output defense, checkpoint sidecar, tools
    if fmt not in FORMATS:
        raise NastyError(f"unknown --format {fmt!r} (choose {', '.join(FORMATS)})")
    target = Path(out)
    if target.is_dir() and not target.is_symlink():
        raise NastyError(f"--out {target} is a directory; name the file to write (e.g. {target / 'model.onnx'})")
    safe_io.check_target(target)  # a link, FIFO or device is refused, --force or not
    if target.exists() and not force:
        raise NastyError(f"--out {target} exists; pass --force to overwrite it")
    exportable_output_defense(output_defense)
    weights, side = read_sidecar(checkpoint)
    if output_defense is not None and (side.get("model") or {}).get("name") == "locked":
        check_after_lock(parse_output_defense(output_defense), side.get("num_classes"))
    sidecar = weights.with_name(SIDECAR) if weights.name == WEIGHTS else weights.with_suffix(".json")
    if target.resolve() in (weights.resolve(), sidecar.resolve()):
        raise NastyError(f"--out {target} is the checkpoint itself")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise NastyError(f"--format onnx needs onnx: {ONNX_INSTALL}") from None
    model, side = load_checkpoint(checkpoint)
    res = export_model(model, side, target, fmt, output_defense)
    c, h, w = side["input_shape"]
    x = check_images(side)
    got = run_exported(target, x, fmt)
    decisions = ServedModel(model, side["normalization"]["mean"], side["normalization"]["std"]).decisions(x)
    res["check"] = compare(got, reference_probabilities(model, side, x, output_defense), decisions) if got is not None else None
    if res["warning"]:
        click.echo(f"warning: {res['warning']}", err=True)
    if as_json:
        click.echo(json.dumps(res))
        return
    chk = res["check"]
    checked = (f"; checked against PyTorch on {chk['images']} random images: max |diff| {chk['max_abs_diff']:.1e}, "
               f"the model's own decision on {100 * chk['argmax_agreement']:.0f}% of them on top"
               f"{' (' + str(chk['ties']) + ' tied with another class)' if chk['ties'] else ''}" if chk else "; not checked (onnxruntime is not installed)")
    click.echo(f"exported {checkpoint} -> {target} ({fmt}, {res['bytes']} bytes; input {INPUT_NAME} "
               f"(N,{c},{h},{w}) in [0,1], output {OUTPUT_NAME} (N,{side['num_classes']})"
               f"{', output defense ' + res['output_defense'] if res['output_defense'] else ''}{checked})")
