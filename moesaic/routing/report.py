"""The per-layer routing report a merge prints: how distinguishable the router rows are.

Per layer: the condition number of the rows (E, D) centred across experts (large: some row
is nearly an affine combination of the others, so no token can prefer it cleanly). Centred,
because softmax ignores a shift every row shares: the rows as stored would be singular by
construction whenever one is zero (the public row of learned-rows over a dense base, and of
contrast), whatever the others. Centring leaves rank at most E - 1, so the number is over
the E - 1 largest singular values (NaN for one expert). Also the largest cosine between two
rows and which pair. A warning names the layers where two rows are nearly parallel (cosine
above `warn_cosine`, default 0.98): those experts will be chosen together or not at all.
"""

from __future__ import annotations

import numpy as np


def layer_report(rows_ed: np.ndarray) -> dict:
    rows = rows_ed.astype(np.float64)
    centred = rows - rows.mean(axis=0, keepdims=True)
    singular = np.linalg.svd(centred, compute_uv=False)[:len(rows) - 1]
    if not len(singular):  # one expert: nothing to tell apart
        cond = float("nan")
    else:
        cond = float(singular[0] / singular[-1]) if singular[-1] > 0 else float("inf")
    norms = np.linalg.norm(rows, axis=1)
    unit = rows / np.maximum(norms, 1e-12)[:, None]
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    i, j = np.unravel_index(int(np.argmax(cos)), cos.shape) if len(rows) > 1 else (0, 0)
    max_cos = float(cos[i, j]) if len(rows) > 1 else float("nan")
    return {"condition_number": cond, "max_cosine": max_cos, "pair": (int(i), int(j)),
            "row_norms": [float(n) for n in norms]}


def routing_report(rows_led: np.ndarray, sources: list[str], warn_cosine: float = 0.98
                   ) -> tuple[list[dict], list[str]]:
    """(per-layer reports, warnings)."""
    reports, warnings = [], []
    for layer, rows in enumerate(rows_led):
        r = layer_report(rows)
        r["layer"] = layer
        reports.append(r)
        i, j = r["pair"]
        if len(sources) > 1 and r["max_cosine"] > warn_cosine:
            warnings.append(f"layer {layer}: router rows of {sources[i]!r} and {sources[j]!r} "
                            f"are nearly parallel (cosine {r['max_cosine']:.4f}); these experts "
                            f"will be hard to tell apart")
    return reports, warnings


def format_report(reports: list[dict], sources: list[str]) -> str:
    lines = [f"routing report ({len(sources)} experts: {', '.join(sources)})",
             f"{'layer':>5} {'cond':>12} {'max cos':>8}  pair"]
    for r in reports:
        i, j = r["pair"]
        lines.append(f"{r['layer']:>5} {r['condition_number']:>12.4g} {r['max_cosine']:>8.4f}"
                     f"  {sources[i]}/{sources[j]}")
    return "\n".join(lines)
