"""``nasty audit``: plan -> execute -> analyse -> report.

1. :mod:`nasty.audit.plan` validates the request, loads the teacher(s) and the data, lists the runs
   (attacks x students x seeds, plus the two label-only baselines) and the key of each;
2. :mod:`nasty.audit.execute` trains the runs that are not finished yet, saving each as it ends (an
   interrupted audit resumes; finished runs are reused);
3. :mod:`nasty.audit.analyse` turns the runs into the audit object (per attack and class: gain,
   interval, p-value, decision; :mod:`nasty.audit.stats`);
4. :mod:`nasty.audit.render` writes audit.md and audit.html beside audit.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..checkpoint import atomic_write_json, versions
from ..errors import AuditIncomplete
from .analyse import analyse
from .execute import execute
from .plan import AuditSettings, open_folder, plan_audit
from .render import write_reports

__all__ = ["AuditSettings", "run_audit"]


def run_audit(s: AuditSettings, out: str | Path, *, force: bool = False, log: Callable[[str], None] = print,
              verbose: bool = False, executor: Any = None) -> dict:
    """Run (or resume) the audit into ``out``; write audit.json/.md/.html; return the audit object.

    ``executor`` trains the pending runs (default :class:`nasty.audit.execute.LocalExecutor`). Raises
    :class:`AuditIncomplete` (exit code 3) after writing the reports when a run failed.
    """
    out = Path(out)
    plan = plan_audit(s, log)
    open_folder(plan, out, force)
    ex, facts = execute(plan, out, log, verbose, executor)
    skipped = dict(plan.skipped)
    for gk, per in ex.skipped_students.items():
        if len(per) == len(s.students):
            reasons = set(per.values())
            skipped[gk] = reasons.pop() if len(reasons) == 1 else "; ".join(f"{st}: {r}" for st, r in per.items())
    audit = analyse(s, plan.data, plan.attacks, ex.runs, facts["teacher_pred"], skipped, ex.failed, plan.notes, plan.config,
                    ex.skipped_students)
    for g, d in plan.defenses.items():
        audit["targets"][g]["defense"] = d
    for g, q in facts["quality"].items():
        audit["targets"][g]["quality"] = q
    audit["runtime"] = facts["runtime"]
    audit["versions"] = versions()
    atomic_write_json(out / "audit.json", audit)
    write_reports(audit, out)
    if audit["status"] != "complete" and not audit["gate"]["failed"]:
        raise AuditIncomplete(f"audit incomplete: {'; '.join(audit['problems'])} (reports written to {out}; re-run to resume)")
    return audit
