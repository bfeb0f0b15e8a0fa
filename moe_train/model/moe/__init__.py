"""The Mixture-of-Experts FFN, one concern a file: router.py (routing and its losses), dispatch.py
(the dispatcher contract), experts.py, and layer.py (route -> dispatch -> experts -> combine)."""

from moe_train.model.moe.dispatch import Dispatcher, LocalDispatcher
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.layer import MoE, dropless, is_expert_param, moe_layers
from moe_train.model.moe.router import MoEStats, Routing, TopKRouter

__all__ = [
    "Dispatcher",
    "GroupedExperts",
    "LocalDispatcher",
    "MoE",
    "MoEStats",
    "Routing",
    "TopKRouter",
    "dropless",
    "is_expert_param",
    "moe_layers",
]
