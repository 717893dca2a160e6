"""OLMo-2 7B shapes, the FlexOlmo base: 32 layers, d_model 4096, 32 heads, SwiGLU 11008.

    moesaic plan --config moesaic/configs/olmo2_7b.py:source=code --mesh data=1,fsdp=8 --hbm 80GB

`experts=n` gives the branch (n=2: public + own) or merged MoE of n experts over this base.
"""

from moesaic.configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, source="", experts=2)
    config = common.build(
        model=dict(vocab_size=100352, eos_id=100257, pad_id=100277, tokenizer="tokenizer.json",
                   d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                   rope_theta=500_000.0, n_experts=args.experts, top_k=args.experts,
                   dtype="bfloat16", remat="full"),
        seq_len=4096, global_batch=512, steps=10_000, lr=9e-4, source=args.source,
    )
    config.mesh.update(data=-1, fsdp=8)
    return config
