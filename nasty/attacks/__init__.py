"""Attacks: the ways a thief learns from a (defended) teacher.

One module per attack; each registers a subclass of :class:`nasty.attacks.base.Attack` with
``@register_attack``. :mod:`nasty.attacks.run` runs them (threat model, attacker's data, training).
"""

from .base import ATTACKS, Attack, get_attack, register_attack
from .run import PreparedAttack, can_share_pass, check_requirements, prepare_attack, run_attack, run_attacks_together

# Importing an attack module registers its attacks.
from . import attention, augavg, averager, copycat, ensemble, hint, kd, knockoff, rehead, scratch, skeptical, tllm, top1conf  # noqa: E402,F401

__all__ = ["ATTACKS", "Attack", "PreparedAttack", "can_share_pass", "check_requirements", "get_attack", "prepare_attack",
           "register_attack", "run_attack", "run_attacks_together"]
