"""Pipelines: what a command does, from validated settings to a run folder.

The CLI parses options into a config and prints results; the work is here. Each pipeline is a plain
function (``train_defended``, ``run_attack_job``, ``run_audit``) that a script can call as well:

- :mod:`nasty.pipelines.defended`: adversary -> defended teacher (locked, strength tuned on
  validation) -> KD probe -> verdict; and ``lock_job`` (two checkpoints -> one locked artifact);
- :mod:`nasty.pipelines.attack`: one attack against one or more teachers, threat model inferred;
- :mod:`nasty.audit`: plan -> execute -> analyse -> report (its own package).
"""
