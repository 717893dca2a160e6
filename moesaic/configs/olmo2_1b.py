"""OLMo-2 1B shapes (allenai/OLMo-2-0425-1B), for planning and for imported checkpoints.

    moesaic plan --config moesaic/configs/olmo2_1b.py:source=code --mesh data=1,fsdp=8 --hbm 24GB

`experts=n` gives the branch/merged MoE of n experts over this base.
"""

from moesaic.configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, source="", experts=2)
    config = common.build(
        model=dict(vocab_size=100352, eos_id=100257, pad_id=100277, tokenizer="tokenizer.json",
                   d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, d_ff=8192,
                   rope_theta=500_000.0, n_experts=args.experts, top_k=args.experts,
                   dtype="bfloat16", remat="full"),
        seq_len=4096, global_batch=512, steps=10_000, lr=9e-4, source=args.source,
    )
    config.mesh.update(data=-1, fsdp=8)
    return config
