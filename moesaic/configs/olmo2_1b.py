"""OLMo-2 1B shapes (allenai/OLMo-2-0425-1B), for planning and for imported checkpoints.

    moesaic plan --config moesaic/configs/olmo2_1b.py:source=code --mesh data=1,fsdp=8 --hbm 24GB

plans the 2-expert branch at the default batch (512 x 4096) in 32 microbatches: 21.46 GB per
device, fits (exit 0; docs/scale.md).

`experts=n` gives the branch/merged MoE of n experts over this base.
"""

from moesaic.configs import common


def get_config(arg=None):
    return common.olmo2(arg, d_model=2048, n_layers=16, n_heads=16, d_ff=8192,
                        microbatches=32)
