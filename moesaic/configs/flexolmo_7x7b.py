"""FlexOlmo 7x7B: the OLMo-2 7B base with 7 experts, 5 active (the released configuration).

    moesaic plan --config moesaic/configs/flexolmo_7x7b.py --mesh data=1,fsdp=8 --hbm 80GB

plans the branch step of the seventh expert over a base of the other six (the whole 7x7B in
memory). At 80GB it is refused (exit 3, with the shortfall): even 8 sequences of 4096 tokens
(--config.data.global_batch=8) need about 101 GB per device; shard more or shorten the sequence.
"""

from moesaic.configs import olmo2_7b


def get_config(arg=None):
    config = olmo2_7b.get_config("experts=7" + (f",{arg}" if arg else ""))
    config.model.top_k = 5
    return config
