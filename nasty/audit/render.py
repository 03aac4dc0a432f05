"""Render an audit object (``audit.json``) as Markdown, as one self-contained HTML page (inline CSS,
the heatmap embedded as a base64 PNG), and as a short terminal table. Rendering reads only the
audit object, so ``nasty report audit.json`` reproduces the files of ``nasty audit``.

Every string taken from the audit object is escaped for its sink (:mod:`nasty.escape`): an audit.json, a
class folder name or a checkpoint path may be hostile. Row builders return plain text; the table writers
escape every cell (:class:`Md` marks the few cells of trusted Markdown)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from .. import escape as esc
from ..checkpoint import atomic_write_bytes
from .analyse import defense_text, resolution_text

TARGET_TITLES = {"teacher": "Audited teacher", "reference": "Reference (undefended) teacher"}


def _f(v, fmt: str = "{:.1f}", none: str = "n/a") -> str:
    return none if v is None else fmt.format(v)


def _ci(ci, fmt: str = "{:+.1f}") -> str:
    if not ci or ci[0] is None:
        return "n/a"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _p(v) -> str:
    if v is None:
        return "n/a"
    return "<0.0001" if v < 1e-4 else f"{v:.4f}" if v < 0.01 else f"{v:.3f}"


def _stats_cfg(audit: dict) -> dict | None:
    """``config.statistics`` (schema 2), or ``None`` for a schema-1 audit (bootstrap intervals, no p-values)."""
    return audit["config"].get("statistics")


def _unit(att: dict) -> str:
    return " (fidelity ratio)" if att["rule"] == "fidelity" else " pts"


def _det(value: float, rule: str) -> str:
    """A detectable gain (points) or fidelity as printed: a gain above 100 points (no accuracy can gain
    that much: the test cannot see any gain) is printed as ">100"; the JSON keeps the number."""
    if rule == "fidelity":
        return f"{value:.2f}"
    return ">100" if value > 100 else f"{value:.1f}"


def _power_cell(att: dict) -> str:
    """Detectable gain (or fidelity) of the classes not transferred, over all students: range and how many are safe."""
    dets = [r["detectable"] for row in att.get("students", {}).values() for r in row["classes"] if r.get("detectable") is not None]
    if att["status"] != "ok" or not dets:
        return "–"
    out = (_det(min(dets), att["rule"]) + "–" + _det(max(dets), att["rule"]) if len(dets) > 1 else _det(dets[0], att["rule"])) + _unit(att)
    safe = [r["safe"] for row in att["students"].values() for r in row["classes"] if r.get("safe") is not None]
    if safe:
        out += f"; safe at this power: {sum(safe)} of {len(safe)}"
    return out


def _classes(idx: list[int], names: list[str]) -> str:
    return ", ".join(f"{i} ({names[i]})" if names[i] != str(i) else str(i) for i in idx) or "none"


def headline(att: dict, C: int) -> str:
    if att["status"] == "skipped":
        return f"skipped: {att['reason']}"
    if att["status"] == "failed":
        return f"FAILED: {att['reason']}"
    return f"{att['transferred_count']} of {C} classes transferable"


def _ok_attacks(target: dict) -> list[tuple[str, dict]]:
    return [(a, v) for a, v in target["attacks"].items() if v["status"] == "ok"]


# ----------------------------------------------------------------------------------------------
# heatmap


def _mpl(s) -> str:
    """Text for a matplotlib label: one line, and a ``$`` is a dollar sign, not the start of math text."""
    return esc.one_line(s).replace("$", r"\$")


def heatmap_png(audit: dict, target: str) -> bytes | None:
    """Gain per (attack, student) x class, transferred cells framed; ``None`` when nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    names = audit["dataset"]["classes"]
    rows, labels, marks, texts = [], [], [], []
    for a, att in _ok_attacks(audit["targets"][target]):
        for st, row in att["students"].items():
            rows.append([np.nan if r["gain"] is None else r["gain"] for r in row["classes"]])
            marks.append([r["transferred"] for r in row["classes"]])
            if att["rule"] == "fidelity":  # the cell shows what the decision used: accuracy / teacher accuracy
                texts.append(["" if r["fidelity"] is None else f"×{r['fidelity']:.2f}" for r in row["classes"]])
            else:
                texts.append(["" if r["gain"] is None else f"{r['gain']:+.1f}" for r in row["classes"]])
            labels.append(_mpl(f"{a} · {st}") + (" (fidelity rule)" if att["rule"] == "fidelity" else ""))
    if not rows:
        return None
    g = np.array(rows, dtype=float)
    finite = g[np.isfinite(g)]
    # separate scales for losses and gains, so a few large losses do not wash out small gains
    norm = TwoSlopeNorm(vmin=min(-1.0, float(finite.min()) if finite.size else -1.0), vcenter=0.0,
                        vmax=max(1.0, float(finite.max()) if finite.size else 1.0))
    C = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * C + 3.2), 0.5 * len(rows) + 1.9), dpi=110)
    im = ax.imshow(g, cmap="RdBu_r", norm=norm, aspect="auto")
    for i in range(len(rows)):
        for j in range(C):
            if texts[i][j]:
                strong = np.isfinite(g[i, j]) and abs(norm(g[i, j]) - 0.5) > 0.32
                ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=8,
                        color="white" if strong else "black", fontweight="bold" if marks[i][j] else "normal")
            if marks[i][j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2))
    ax.set_xticks(range(C))
    ticks = [_mpl(f"{j}: {n}" if n != str(j) else n) for j, n in enumerate(names)]
    turn = C > 6 and max(len(t) for t in ticks) > 3
    ax.set_xticklabels(ticks, rotation=35 if turn else 0, ha="right" if turn else "center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title(f"{TARGET_TITLES.get(target, target)}: gain over the best label-only baseline (points); framed = transferred",
                 fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# text blocks shared by Markdown and HTML


def _summary_rows(audit: dict, target: str) -> list[list[str]]:
    C = len(audit["dataset"]["classes"])
    names = audit["dataset"]["classes"]
    out = []
    for a, att in audit["targets"][target]["attacks"].items():
        studs = att.get("students", {})
        acc = "; ".join(f"{st} {r['accuracy']:.2f} ± {r['accuracy_sd']:.2f}" for st, r in studs.items()) or "–"
        acc += "".join(f"; {st} not run" for st in att.get("skipped_students", {}))
        agr = "; ".join(f"{st} {_f(r.get('teacher_agreement'), '{:.1f}')}" for st, r in studs.items()) or "–"
        row = [a, headline(att, C), att["threshold"] if att["status"] == "ok" else "–",
               _classes(att["transferred_classes"], names) if att["status"] == "ok" else "–"]
        if _has_pooled(audit):
            row.append(pooled_cell(att))
        if _stats_cfg(audit):
            row.append(_power_cell(att))
        out.append(row + [acc, agr])
    return out


def _summary_head(audit: dict) -> list[str]:
    if not _stats_cfg(audit):
        return SUMMARY_HEAD
    p = _stats_cfg(audit)["power"]
    pooled = ["pooled (all classes): gain [95% CI], adjusted p"] if _has_pooled(audit) else []
    return SUMMARY_HEAD[:4] + pooled + [f"not transferred: detectable at {p:.0%} power"] + SUMMARY_HEAD[4:]


def _has_pooled(audit: dict) -> bool:
    """Schema 3 audits carry a pooled test per attack."""
    return audit.get("schema_version", 1) >= 3


def pooled_cell(att: dict) -> str:
    """The attack's pooled verdict in one cell: "pooled: transfers" or "not shown", its numbers and resolution."""
    pl = att.get("pooled")
    if att["status"] != "ok" or not pl:
        return "–"
    if pl.get("rule") == "fidelity":
        nums = f"fidelity {_f(pl.get('fidelity'), '{:.2f}')} {_ci(pl.get('fidelity_ci'), '{:.2f}')}"
    else:
        nums = f"{_f(pl['gain'], '{:+.1f}')} {_ci([pl['ci_low'], pl['ci_high']])} pts"
    out = f"pooled: {'transfers' if pl['transferred'] else 'not shown'}: {nums}, p {_p(pl['p_adjusted'])}"
    if not pl["transferred"] and pl.get("detectable_gain") is not None:
        out += f"; detectable {_det(pl['detectable_gain'], 'gain')} pts"
    if not pl["transferred"] and pl.get("resolution_ok") is False:
        out += f"; cannot show protection at {pl['resolution']:g} pts"
    return out


def resolution_lines(audit: dict, target: str) -> list[str]:
    """One line per attack whose pooled test could not find a leak of ``--resolution`` points (plain text)."""
    out = []
    for a, att in _ok_attacks(audit["targets"][target]):
        pl = att.get("pooled") or {}
        if pl.get("resolution_ok") is False and not pl.get("transferred"):
            out.append(f"{a}: {resolution_text(pl['resolution'])}; its pooled detectable gain is "
                       f"{_det(pl['detectable_gain'], 'gain')} points")
    return out


SUMMARY_HEAD = ["attack", "result", "rule (threshold)", "transferred classes", "student accuracy % (mean ± sd)", "teacher agreement %"]


def _class_rows(audit: dict, target: str) -> tuple[list[str], list[list[str]]]:
    names = audit["dataset"]["classes"]
    t = audit["targets"][target]
    head = ["class", "test n", "teacher acc %"] + [f"{b} {st} %" for b, per in audit["baselines"].items() for st in per]
    rows = []
    for c, n in enumerate(names):
        r = [f"{c}: {n}" if n != str(c) else n, str(audit["dataset"]["test_per_class"][c]), _f(t["per_class_accuracy"][c])]
        r += [_f(per[st]["per_class_accuracy"][c]) for per in audit["baselines"].values() for st in per]
        rows.append(r)
    return head, rows


def _detail_rows(audit: dict, att: dict, st: str) -> tuple[list[str], list[list[str]]]:
    names = audit["dataset"]["classes"]
    sc = _stats_cfg(audit)
    head = ["class", "attack acc %", "baseline (better one) %", "gain, points [95% CI]", "fidelity [95% CI]"]
    if sc:
        head += ["p (adjusted)", f"detectable at {sc['power']:.0%} power"]
    head.append("transferred")
    rows = []
    for r in att["students"][st]["classes"]:
        c = r["class"]
        flag = " UNRELIABLE" if r.get("interval") == "unreliable" else ""
        row = [f"{c}: {names[c]}" if names[c] != str(c) else names[c], _f(r["accuracy"]),
               f"{_f(r['baseline_accuracy'])} ({r['baseline']})" if r["baseline"] else "n/a",
               f"{_f(r['gain'], '{:+.1f}')} {_ci(r['gain_ci'])}{flag}", f"{_f(r['fidelity'], '{:.2f}')} {_ci(r['fidelity_ci'], '{:.2f}')}{flag}"]
        if sc:
            row.append(f"{_p(r.get('p_value'))} ({_p(r.get('p_adjusted'))})")
            det = r.get("detectable")
            row.append("–" if det is None else _det(det, att["rule"])
                       + ("" if r.get("safe") is None else (" (safe)" if r["safe"] else " (not safe)")))
        row.append(Md("**yes**") if r["transferred"] else "no")
        rows.append(row)
    return head, rows


def _found_lines(audit: dict, target: str) -> list[str]:
    """Classes an attack identified itself (TLLM's undistillable classes), for the summary."""
    names = audit["dataset"]["classes"]
    return [f"{a} identified as undistillable (any student or seed): {_classes(att['undistillable_classes'], names)}"
            for a, att in audit["targets"][target]["attacks"].items() if "undistillable_classes" in att]


def _extra_lines(att: dict, names: list[str]) -> list[str]:
    out = [f"Not run with student {st}: {why}" for st, why in att.get("skipped_students", {}).items()]
    if "undistillable_classes" in att:
        out.append(f"Classes TLLM identified as undistillable (any student or seed): {_classes(att['undistillable_classes'], names)}.")
    for st, row in att["students"].items():
        for key, per_seed in row.get("extra", {}).items():
            out.append(f"{st}: {key.replace('_', ' ')} per seed: " + "; ".join(str(v) for v in per_seed))
    return out


def _defense_sentence(target: dict) -> str:
    """The " Defense: ..." sentence, for audits that record it (older audit.json files do not: then nothing)."""
    return f" Defense: {defense_text(target['defense'])}." if "defense" in target else ""


def _quality_sentence(target: dict) -> str:
    """The served-utility sentence, for audits that record it (older audit.json files do not: then nothing)."""
    q = target.get("quality")
    if not q:
        return ""
    return (f" Served outputs on the test split: top-1 {q['top1']:.2f}%, top-5 {q['top5']:.2f}% (ties broken at random), "
            f"calibration error (ECE) {q['ece']:.2f}%, NLL {q['nll']:.3f} nats.")


class Md(str):
    """A table cell that is trusted Markdown (static text), written as it is; every other cell is escaped."""


MD_SINK = {"t": esc.md, "code": esc.md, "b": lambda s: f"**{s}**"}  # code: a data path as literal text, not a code span
HTML_SINK = {"t": esc.html, "code": lambda s: f"<code>{esc.html(s)}</code>", "b": lambda s: f"<b>{s}</b>"}


def _intro(audit: dict, k: dict) -> list[str]:
    """The intro lines for one sink ``k``: ``t`` escapes data as text, ``code`` as code, ``b`` bolds static text."""
    t, code, b = k["t"], k["code"], k["b"]
    cfg = audit["config"]
    ds = audit["dataset"]
    lines = [f"Teacher {code(cfg['teacher'])} (SHA-256 {t(str(cfg['teacher_sha256'])[:12])}…)"
             + (f", reference {code(cfg['reference'])}" if cfg.get("reference") else "")
             + f"; dataset {t(ds['name'])} ({len(ds['classes'])} classes, {t(ds['test_size'])} test images; "
             + (f"the thief holds {t(ds['thief']['images'])} of {t(ds['thief']['pool'])} training images, {t(ds['thief']['labelled'])} "
                "of them labelled)." if ds.get("thief") else f"the thief trains on {t(ds['train_images'])} images)."),
             f"Teacher access: {code('--query ' + str(cfg['query']))}. Students: {t(', '.join(map(str, cfg['students'])))}; seeds: "
             f"{t(', '.join(map(str, cfg['seeds'])))}; {t(cfg['train'].get('epochs'))} epochs each.",
             f"Status: {b(t(audit['status']))}" + (f" ({t('; '.join(map(str, audit['problems'])))})" if audit["problems"] else "") + "."]
    sc = _stats_cfg(audit)
    if sc:
        n_seeds = len(cfg["seeds"])
        corr = b(t(sc["correction_name"] if sc["correction"] != "none" else "no") + " correction")
        if _has_pooled(audit):
            family = (f"over every test of the audit (all attacks' per-class and pooled tests, the pooled ones holding "
                      f"{sc.get('pooled_share', 0.5):g} of the weight)")
        else:
            family = "over the classes and students of each attack"
        lines.append(f"Statistics: 95% t-intervals with the seed as the unit of replication; one-sided tests of gain > "
                     f"{cfg['margin']:g} points, {corr} {family} (alpha {sc['alpha']:g}); detectable gains at "
                     f"{sc['power']:.0%} power" + (f"; safe below {sc['safe_below']:g} points" if sc.get("safe_below") is not None
                                                     else "") + (f"; resolution {sc['resolution']:g} points (pooled)"
                                                                 if _has_pooled(audit) and sc.get("resolution") is not None else "") + ".")
        if sc["intervals"] == "unreliable":
            lines.append(f"{b('Every interval is UNRELIABLE')}: one seed captures no training noise (use --seeds {t(sc['recommended_seeds'])}).")
        elif sc["intervals"] == "approximate":
            lines.append(f"Intervals are {b('approximate')} with {n_seeds} seeds ({t(sc['recommended_seeds'])} or more recommended).")
    else:
        lines.append("Statistics: schema-1 audit (percentile bootstrap intervals, no multiple-comparison correction).")
    gate = audit["gate"]
    if gate["fail_on"] is not None:
        lines.append(f"Gate {code('--fail-on ' + str(gate['fail_on']))}: "
                     + (f"{b('FAILED')} by {t(', '.join(map(str, gate['failing_attacks'])))}" if gate["failed"] else "passed") + ".")
    return lines


# ----------------------------------------------------------------------------------------------
# Markdown


def _md_cell(s) -> str:
    return str(s) if isinstance(s, Md) else esc.md(s)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows])


def render_markdown(audit: dict) -> str:
    e = esc.md
    names = audit["dataset"]["classes"]
    md = ["# nasty audit: which classes can a thief copy?", ""]
    md += [f"- {line}" for line in _intro(audit, MD_SINK)] + [""]
    for target in audit["targets"]:
        notes = _found_lines(audit, target) + resolution_lines(audit, target)
        md += [f"## {e(TARGET_TITLES.get(target, target))}: summary",
               f"Teacher test accuracy {audit['targets'][target]['accuracy']:.2f}%." + e(_defense_sentence(audit["targets"][target]))
               + e(_quality_sentence(audit["targets"][target])), "",
               _md_table(_summary_head(audit), _summary_rows(audit, target)), ""]
        md += [f"- {e(line)}" for line in notes] + ([""] if notes else [])
    if audit.get("defense_effect"):
        md += ["## What the defense bought", "Classes transferred from the reference but not from the audited teacher "
               "are protected by the defense.", "",
               _md_table(["attack", "protected", "still transferred", "newly transferred"],
                         [[a, _classes(v["protected_classes"], names), _classes(v["still_transferred"], names),
                           _classes(v["newly_transferred"], names)] for a, v in audit["defense_effect"].items()]), ""]
    for target in audit["targets"]:
        head, rows = _class_rows(audit, target)
        md += [f"## Per-class accuracy: {e(TARGET_TITLES.get(target, target).lower())} and baselines", "", _md_table(head, rows), ""]
    md += ["## Details per attack and student", ""]
    for target in audit["targets"]:
        for a, att in _ok_attacks(audit["targets"][target]):
            for st in att["students"]:
                head, rows = _detail_rows(audit, att, st)
                md += [f"### {e(a)} vs {e(target)}, student {e(st)} ({e(att['rule'])} rule)", "", _md_table(head, rows), ""]
            md += [f"- {e(line)}" for line in _extra_lines(att, names)] + [""]
    md += ["## What each attack assumes of the thief", ""]
    for a, att in audit["targets"]["teacher"]["attacks"].items():
        md.append(f"- **{e(a)}**: {e(att['assumes'])}" + (f" *Not run: {e(att['reason'])}*" if att["status"] != "ok" else ""))
    md += ["", "## Method", ""] + [f"- **{e(k)}**: {e(v)}" for k, v in audit["method"].items()]
    md += [f"- {e(_method_tail(audit))}", ""]
    if audit.get("notes"):
        md += ["## Notes", ""] + [f"- {e(n)}" for n in audit["notes"]] + [""]
    return "\n".join(md)


# ----------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;
padding:0 18px;color:#1d2330;line-height:1.45;font-size:15px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:30px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px;width:100%}
th,td{border:1px solid #d5dae3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.yes td{background:#fde8e6}.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:13px}
.bad{background:#f8d3cf;color:#8a1c12}.good{background:#d7f0dc;color:#17592a}.muted{background:#eceef2;color:#555}
.box{background:#f7f8fb;border:1px solid #e1e5ec;border-radius:6px;padding:10px 14px;margin:10px 0}
img{max-width:100%;height:auto;border:1px solid #e1e5ec}small{color:#5a6272}code{background:#f1f3f7;padding:0 3px}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


_h = esc.html


def _is_number(v: str) -> bool:
    try:
        float(v.split(" ")[0].rstrip("%"))
        return " " not in v or v.split(" ", 1)[1].startswith(("[", "("))
    except ValueError:
        return False


def _html_table(head: list[str], rows: list[list[str]], yes_col: int | None = None, text_cols: tuple[int, ...] = (0,)) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_h(c)}</th>" for c in head) + "</tr>"]
    for r in rows:
        cls = ' class="yes"' if yes_col is not None and "yes" in r[yes_col] else ""
        cells = []
        for i, v in enumerate(r):
            v = str(v).replace("**", "") if isinstance(v, Md) else str(v)
            num = i not in text_cols and _is_number(v)
            cells.append(f'<td class="num">{_h(v)}</td>' if num else f"<td>{_h(v)}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def render_html(audit: dict) -> str:
    names = audit["dataset"]["classes"]
    C = len(names)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>nasty audit</title><style>{CSS}</style></head><body>",
             "<h1>nasty audit: which classes can a thief copy?</h1>",
             '<div class="box">' + "<br>".join(_intro(audit, HTML_SINK)) + "</div>"]
    for target in audit["targets"]:
        t = audit["targets"][target]
        parts.append(f"<h2>{_h(TARGET_TITLES.get(target, target))}</h2><p>Teacher test accuracy <b>{t['accuracy']:.2f}%</b>."
                     f"{_h(_defense_sentence(t))}{_h(_quality_sentence(t))}</p>")
        chips = []
        for a, att in t["attacks"].items():
            kind = "muted" if att["status"] != "ok" else ("bad" if att["transferred_count"] else "good")
            chips.append(f'<span class="badge {kind}">{_h(a)}: {_h(headline(att, C))}</span>')
        parts.append("<p>" + " ".join(chips) + "</p>")
        parts.append(_html_table(_summary_head(audit), _summary_rows(audit, target), text_cols=tuple(range(len(_summary_head(audit))))))
        parts += [f"<p>{_h(line)}.</p>" for line in _found_lines(audit, target)]
        parts += [f'<p class="box"><b>{_h(line)}</b>.</p>' for line in resolution_lines(audit, target)]
        png = heatmap_png(audit, target)
        if png:
            parts.append(f'<img alt="gain heatmap, {_h(target)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
            parts.append("<p><small>Colour: student accuracy minus the better label-only baseline for that class, in points "
                         "(red: the thief gains, blue: the thief loses; gains and losses have separate scales). Cell text: the gain, "
                         "or for fidelity-rule rows the student's accuracy as a fraction of the teacher's (×). A framed cell is a "
                         "transferred class under the attack's rule.</small></p>")
    if audit.get("defense_effect"):
        parts.append("<h2>What the defense bought</h2><p>Classes transferred from the reference but not from the audited teacher.</p>")
        parts.append(_html_table(["attack", "protected", "still transferred", "newly transferred"],
                                 [[a, _classes(v["protected_classes"], names), _classes(v["still_transferred"], names),
                                   _classes(v["newly_transferred"], names)] for a, v in audit["defense_effect"].items()],
                                 text_cols=(0, 1, 2, 3)))
    for target in audit["targets"]:
        head, rows = _class_rows(audit, target)
        parts.append(f"<h2>Per-class accuracy: {_h(TARGET_TITLES.get(target, target).lower())} and baselines</h2>")
        parts.append(_html_table(head, rows))
    parts.append("<h2>Details per attack and student</h2>")
    for target in audit["targets"]:
        for a, att in _ok_attacks(audit["targets"][target]):
            for st in att["students"]:
                head, rows = _detail_rows(audit, att, st)
                r = att["students"][st]
                parts.append(f"<details><summary>{_h(a)} vs {_h(target)}, student {_h(st)} ({_h(att['rule'])} rule): "
                             f"{r['transferred_count']} of {C} transferred, accuracy {r['accuracy']:.2f}%</summary>")
                parts.append(_html_table(head, rows, yes_col=len(head) - 1))
                parts += [f"<p>{_h(x)}</p>" for x in _extra_lines(att, names)]
                parts.append("</details>")
    parts.append("<h2>What each attack assumes of the thief</h2><ul>")
    for a, att in audit["targets"]["teacher"]["attacks"].items():
        parts.append(f"<li><b>{_h(a)}</b>: {_h(att['assumes'])}" + (f" <i>Not run: {_h(att['reason'])}</i>" if att["status"] != "ok" else "") + "</li>")
    parts.append("</ul><h2>Method</h2><ul>")
    parts += [f"<li><b>{_h(k)}</b>: {_h(v)}</li>" for k, v in audit["method"].items()]
    parts.append(f"<li>{_h(_method_tail(audit))}</li></ul>")
    if audit.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_h(n)}</li>" for n in audit["notes"]) + "</ul>")
    parts.append(f"<p><small>nasty {_h(audit.get('versions', {}).get('nasty', ''))}, schema {_h(audit['schema'])} "
                 f"v{audit['schema_version']}, created {_h(audit.get('created', ''))}.</small></p></body></html>")
    return "\n".join(parts)


def terminal_table(audit: dict) -> str:
    """A short table for the terminal; every line passes through :func:`nasty.escape.term` (one line each)."""
    C = len(audit["dataset"]["classes"])
    lines = []
    for target, t in audit["targets"].items():
        q = t.get("quality")
        served = f"; served top-5 {q['top5']:.2f}%, ECE {q['ece']:.2f}%, NLL {q['nll']:.3f}" if q else ""
        lines.append(f"{TARGET_TITLES.get(target, target)} (accuracy {t['accuracy']:.2f}%{served}):")
        width = max([len(esc.term(a)) for a in t["attacks"]] + [6])
        for a, att in t["attacks"].items():
            tail = f"  [{att['threshold']}] classes {att['transferred_classes']}" if att["status"] == "ok" else ""
            if att["status"] == "ok" and _has_pooled(audit):
                tail += f"; {pooled_cell(att)}"
            if att["status"] == "ok" and _stats_cfg(audit) and _power_cell(att) != "–":
                tail += f"; not transferred: detectable {_power_cell(att)}"
            lines.append(f"  {esc.term(a):<{width}}  {headline(att, C)}{tail}")
        lines += [f"  {line}" for line in resolution_lines(audit, target)]
    sc = _stats_cfg(audit)
    if sc and sc["intervals"] != "ok":
        lines.append(f"intervals {sc['intervals'].upper()} with {len(audit['config']['seeds'])} seed(s); "
                     f"{sc['recommended_seeds']} or more recommended")
    g = audit["gate"]
    if g["fail_on"] is not None:
        lines.append(f"gate --fail-on {g['fail_on']}: " + (f"FAILED ({', '.join(map(str, g['failing_attacks']))})" if g["failed"] else "passed"))
    if audit["status"] != "complete":
        lines.append(f"audit INCOMPLETE: {'; '.join(map(str, audit['problems']))}")
    return "\n".join(esc.term(line) for line in lines)


def _method_tail(audit: dict) -> str:
    sc = _stats_cfg(audit)
    if sc:
        return (f"Settings: level {sc['level']:g}, alpha {sc['alpha']:g} (one-sided), correction {sc['correction']}, power "
                f"{sc['power']:g}, safe below {sc['safe_below'] if sc.get('safe_below') is not None else 'not set'}; "
                f"intervals {sc['intervals']} ({len(audit['config']['seeds'])} seeds). Analytic: no resampling.")
    b = audit["config"].get("bootstrap", {})
    return f"Bootstrap: {b.get('replicates')} replicates, generator seed {b.get('seed')}."


def write_reports(audit: dict, out: str | Path, formats: tuple[str, ...] = ("md", "html")) -> list[Path]:
    out = Path(out)
    written = []
    if "md" in formats:
        atomic_write_bytes(out / "audit.md", render_markdown(audit).encode())
        written.append(out / "audit.md")
    if "html" in formats:
        atomic_write_bytes(out / "audit.html", render_html(audit).encode())
        written.append(out / "audit.html")
    return written
