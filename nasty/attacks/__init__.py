"""Attacks: the ways a thief learns from a (defended) teacher.

One module per attack; each registers a subclass of :class:`nasty.attacks.base.Attack` with
``@register_attack``. :mod:`nasty.attacks.run` runs them (threat model, attacker's data, training).
"""

from .base import ATTACKS, Attack, get_attack, register_attack
from .run import PreparedAttack, can_share_pass, check_requirements, prepare_attack, run_attack, run_attacks_together

from ..registry import import_all

import_all(__name__, __path__)  # every attack module registers its attacks: a new attack is one new file

__all__ = ["ATTACKS", "Attack", "PreparedAttack", "can_share_pass", "check_requirements", "get_attack", "prepare_attack",
           "register_attack", "run_attack", "run_attacks_together"]
