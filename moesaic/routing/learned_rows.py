"""learned-rows: FlexOlmo's router, the stack of the rows and biases each branch trained.

The base's experts keep the base router's rows and biases; a dense base's public row is the
zero vector with bias 0, the row the branch job held frozen beside the party's own (see
moesaic.branch_train.upcycle), so each party's learned boundary r_i.x + b_i > r_pub.x
holds in the merged model as it did in training.
"""

from __future__ import annotations

import numpy as np

from moesaic.routing.registry import Router, RouterInputs


def build(inputs: RouterInputs) -> Router:
    lyr, d, eb = inputs.n_layers, inputs.d_model, inputs.base_experts
    if inputs.base_rows is None:
        base_rows = np.zeros((lyr, eb, d), np.float32)
        base_bias = np.zeros((lyr, eb), np.float32)
    else:
        base_rows = inputs.base_rows.astype(np.float32)
        base_bias = (np.zeros((lyr, eb), np.float32) if inputs.base_bias is None
                     else inputs.base_bias.astype(np.float32))
    rows = [base_rows] + [inputs.party_rows(i)[:, None, :].astype(np.float32)
                          for i in range(inputs.n_parties)]
    bias = [base_bias] + [inputs.party_bias(i)[:, None].astype(np.float32)
                          for i in range(inputs.n_parties)]
    public = "base router rows" if inputs.base_rows is not None else "zero row (dense base)"
    return Router(np.concatenate(rows, axis=1), np.concatenate(bias, axis=1),
                  {"parties": "rows and biases trained in each branch", "public": public})
