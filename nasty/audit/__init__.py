"""``nasty audit``: which classes of a teacher can a thief copy? Per-class decisions with
t-intervals over seeds, one-sided tests, multiple-comparison control and detectable gains (:mod:`.stats`,
calibrated with :mod:`.simulate`), runs shared and resumable (:mod:`.run`), a versioned
``audit.json`` (:mod:`.schema`) rendered as Markdown and HTML (:mod:`.render`)."""

from .run import AuditSettings, run_audit
from .schema import SCHEMA, SCHEMA_VERSION, load_audit, validate

__all__ = ["AuditSettings", "run_audit", "SCHEMA", "SCHEMA_VERSION", "load_audit", "validate"]
