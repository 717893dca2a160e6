"""FlexOlmo 7x7B: the OLMo-2 7B base with 7 experts, 5 active (the released configuration).

    moesaic plan --config moesaic/configs/flexolmo_7x7b.py --mesh data=1,fsdp=8 --hbm 80GB

plans the branch step of the seventh expert over a base of the other six (the whole 7x7B in
memory) on 8 devices: its batch of 512 sequences of 4096 tokens in 64 microbatches (one
sequence per device each) needs 75.78 GB per device with the frozen base in bfloat16
(train.frozen_dtype="compute"), which fits 80 GB; 89.52 GB with it kept in float32
(docs/launch.md).

The merged model of the seven runs expert-parallel, one expert per device of an expert axis
of 8 (padded with one slot that is never routed):

    moesaic plan --config moesaic/configs/flexolmo_7x7b.py --job eval --mesh data=1,expert=8 \
        --hbm 80GB
    moesaic plan --config moesaic/configs/flexolmo_7x7b.py --job decode --mesh data=1,expert=8 \
        --hbm 80GB

8 sequences of 4096 tokens: eval 44.83 GB per device (37.01 GB with --dispatch all_to_all),
one decoding step against a 4096-slot cache 48.09 GB.
"""

from moesaic.configs import olmo2_7b


def get_config(arg=None):
    config = olmo2_7b.get_config("experts=7" + (f",{arg}" if arg else ""))
    config.model.top_k = 5
    config.train.microbatches = 64  # 8 sequences a step, one per device of fsdp=8
    return config
