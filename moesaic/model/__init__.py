"""The one Flax NNX transformer (OLMo-2 block) with its stacked-expert MoE FFN."""

from moesaic.model.config import ModelConfig
from moesaic.model.moe import RouterState
from moesaic.model.sharding import make_mesh, state_shardings
from moesaic.model.transformer import Decoder, lm_loss, token_nll

__all__ = ["Decoder", "ModelConfig", "RouterState", "lm_loss", "make_mesh", "state_shardings",
           "token_nll"]
