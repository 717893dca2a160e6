"""OLMo-2 7B shapes, the FlexOlmo base: 32 layers, d_model 4096, 32 heads, SwiGLU 11008.

    moesaic plan --config moesaic/configs/olmo2_7b.py:source=code --mesh data=1,fsdp=8 --hbm 80GB

plans the 2-expert branch at the default batch (512 sequences of 4096 tokens) in 32
microbatches (train.microbatches), bf16 compute over float32 master parameters, the frozen
base's matrices held in bf16: 49.70 GB per device, fits (exit 0; docs/scale.md).

`experts=n` gives the branch (n=2: public + own) or merged MoE of n experts over this base.
"""

from moesaic.configs import common


def get_config(arg=None):
    return common.olmo2(arg, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                        microbatches=32)
