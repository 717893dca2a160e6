"""The systems the demo's report compares: their names, the merges' router kinds and which
systems the per-domain plot shows."""

from __future__ import annotations

from moesaic.configs.demo import DOMAINS

__all__ = ["DOMAINS"]  # the private domains, defined with the demo's settings

ROUTERS = ("learned-rows", "contrast", "centroid", "ridge", "random")
# Router options, picked on small probes that used held-out sequences (so the merged rows of
# these two kinds are slightly tuned to the evaluation): ridge rows regress one-hot labels and
# their logits are small, scale 5 was the best of (1, 5, 20); contrast selectivity 2 was the
# best of (0, 2, 4).
ROUTER_OPTIONS = {"ridge": {"scale": 5.0}, "contrast": {"selectivity": 2.0}}
OPT_OUT = "code"
CEILING = "each branch alone on its domain"
DENSE_OWN = "each dense expert on its own domain"  # what BTM's posterior picks, at best
TUNED = "merged MoE (learned-rows, router tuned)"
# the learned-rows merge calibrated on public proxy rows: the party gate (moesaic.merge.calibrate)
CALIBRATED = "merged MoE (learned-rows, calibrated)"
CALIBRATION_ROWS = 64
BTX = "BTX (random router)"
BTX_TUNED = "BTX (router tuned on public data)"
# The systems of the per-domain bar plot: one of each kind (the other routers, the opt-out and
# the dense experts off their own domains are in the tables and the average plot).
HEADLINE = ("public model", "soup (uniform)", "soup (weighted)", "BTM (top-2)", "c-BTM (top-2)",
            BTX_TUNED, "merged MoE (learned-rows)", TUNED, CALIBRATED, CEILING,
            "unrestricted MoE (all data)", DENSE_OWN)

# The uncoordinated experts' merges: router kind -> what its rows are. Their learned rows are
# the initial rows (config.branch.router_init), which an ffn job never trains.
UNCOORDINATED_ROWS = {"learned-rows": "initial rows", "ridge": "ridge"}
UNCOORDINATED = {r: f"merged uncoordinated experts ({rows})"  # router kind -> system name
                 for r, rows in UNCOORDINATED_ROWS.items()}
FFN_ALONE = "each uncoordinated FFN expert alone on its domain"
