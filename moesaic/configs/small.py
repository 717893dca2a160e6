"""small: d_model 512, 8 layers, 8 experts of width 1408 (top-2); the benchmark shape.

    python bench/train_step.py --configs small
    moesaic plan --config moesaic/configs/small.py --mesh data=1,fsdp=8 --hbm 16GB
"""

from moesaic.configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, source="", experts=8, top_k=2)
    return common.build(
        model=dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408,
                   n_experts=args.experts, top_k=args.top_k),
        seq_len=512, global_batch=16, steps=1000, lr=1e-3, source=args.source,
    )
