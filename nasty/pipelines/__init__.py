"""Pipelines: what a command does, from validated settings to a run folder.

The CLI parses options into a config and prints results; the work is here. Each pipeline is a plain
function (``train_defended``, ``run_attack_job``, ``run_audit``) that a script can call as well:

- :mod:`nasty.pipelines.defended`: adversary -> defended teacher (locked, strength tuned on
  validation) -> KD probe -> verdict;
- :mod:`nasty.pipelines.attack`: one attack against one or more teachers, threat model inferred;
- :mod:`nasty.pipelines.checkpoints`: ``lock_job`` (two checkpoints -> one locked artifact),
  ``eval_job``, ``convert_job`` (a weights-only state dict -> a safe checkpoint);
- :mod:`nasty.audit`: plan -> execute -> analyse -> report (its own package).
"""
