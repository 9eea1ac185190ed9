"""Optimisers (registry kind ``optimizers``): a recipe's ``optimizer`` spec names one and gives its kwargs; the
training step sets each group's ``lr`` from the schedule every step, so ``lr`` is the schedule's base value."""

from __future__ import annotations

import torch

from decathlete.registry import register_optimizer

register_optimizer("sgd")(torch.optim.SGD)
register_optimizer("adam")(torch.optim.Adam)
register_optimizer("adamw")(torch.optim.AdamW)
