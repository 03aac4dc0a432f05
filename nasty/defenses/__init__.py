"""Training-time defenses: a teacher whose soft outputs mislead students.

One module per defense; each subclasses :class:`nasty.defenses.base.Defense`, registers itself with
``@register_defense`` and returns an :class:`nasty.train.Objective` for the one training loop. The
decision lock (:mod:`nasty.defenses.lock`) and the output post-processors (:mod:`nasty.defenses.output`)
sit beside them. Going from data to a defended teacher is a pipeline: :mod:`nasty.pipelines.defended`.
"""

from .base import (DEFENSES, PAPER_OMEGA, Defense, check_defense_keys, defense_params, get_defense, list_defenses, register_defense,
                   split_model_specs)

from .output import DefendedModel, parse_output_defense
from ..registry import import_all

import_all(__name__, __path__)  # every defense module registers its defenses: a new defense is one new file

__all__ = ["DEFENSES", "PAPER_OMEGA", "Defense", "DefendedModel", "check_defense_keys", "defense_params", "get_defense",
           "list_defenses", "parse_output_defense", "register_defense", "split_model_specs"]
