"""tiny: the embedded default. Byte vocabulary, 4 layers of width 128; trains on 2 CPU cores
in minutes.

    moesaic train --config moesaic/configs/tiny.py --workdir runs/t --config.train.steps=50
    moesaic pretrain --config moesaic/configs/tiny.py --workdir runs/w
    moesaic branch --config moesaic/configs/tiny.py:source=code --base runs/w/public \
        --workdir runs/w/branches/code

Arguments (`tiny.py:source=code,experts=2`): `source` names the party's data for a branch job;
`experts` makes the model an MoE with that many experts (top-k all of them).
"""

from moesaic.configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, source="", experts=1)
    return common.build(
        model=dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512,
                   n_experts=args.experts, top_k=args.experts),
        seq_len=128, global_batch=16, steps=300, lr=3e-3, source=args.source,
    )
