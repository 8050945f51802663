"""Table 3's adaptation modes as data (``mthl-ds adapt --mode``), apart from the code that runs them
(``mthl_ds.adapt``), so the command line can list them without importing torch."""
from __future__ import annotations

from typing import Optional

ROUTERS = {"freeze_backbone": True}
# name -> (phases, top_k): each phase is the adapt section of one run; a second phase starts from the first's
# export and reads the routing statistics of its new router (pruning, most/least-used selection).
MODES: dict[str, tuple[list[dict], Optional[int]]] = {
    "full": ([{"freeze_backbone": False}], None),
    "adapter": ([{"adapter_reduction": 4}], None),
    "routers": ([ROUTERS], None),
    "routers_1ex": ([{"tune_experts": 1}], None),
    "routers_2ex": ([{"tune_experts": 2}], None),
    "prune_theta1": ([ROUTERS, {"prune_threshold": 0.01, "freeze_backbone": False}], None),
    "prune_theta5": ([ROUTERS, {"prune_threshold": 0.05, "freeze_backbone": False}], None),
    "prune_half": ([ROUTERS, {"prune_fraction": 1 / 2, "freeze_backbone": False}], None),
    "prune_2_3": ([ROUTERS, {"prune_fraction": 2 / 3, "freeze_backbone": False}], None),
    "topk3": ([{"freeze_backbone": False}], 3),
    "topk2": ([{"freeze_backbone": False}], 2),
    "topk1": ([{"freeze_backbone": False}], 1),
    "hybrid_a": ([ROUTERS, {"prune_fraction": 2 / 3, "tune_experts": 1}], 2),
    "hybrid_b": ([ROUTERS, {"prune_fraction": 2 / 3, "tune_experts": 2}], 3),
}
# Table A1: the expert-selection ablation, on top of routers_1ex / routers_2ex
for _n in (1, 2):
    for _sel in ("most_used", "least_used"):
        MODES[f"routers_{_n}ex_{_sel}"] = ([ROUTERS, {"tune_experts": _n, "selection": _sel}], None)
