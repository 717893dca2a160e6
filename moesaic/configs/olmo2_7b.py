"""OLMo-2 7B shapes, the FlexOlmo base: 32 layers, d_model 4096, 32 heads, SwiGLU 11008.

    moesaic plan --config moesaic/configs/olmo2_7b.py:source=code --mesh data=1,fsdp=8 --hbm 80GB

`experts=n` gives the branch (n=2: public + own) or merged MoE of n experts over this base.
"""

from moesaic.configs import common


def get_config(arg=None):
    return common.olmo2(arg, d_model=4096, n_layers=32, n_heads=32, d_ff=11008)
