"""Lightning on cai_labs ranks: a cluster environment for forked ranks, a ZeRO strategy in the
manner of lightning-colossalai's ColossalAIStrategy, a Trainer helper and a measuring callback."""

from cai_labs.lightning.environment import ProcessGroupEnvironment
from cai_labs.lightning.trainer import make_strategy, rank_trainer
from cai_labs.lightning.zero_strategy import ZeroStrategy

__all__ = ["ProcessGroupEnvironment", "ZeroStrategy", "make_strategy", "rank_trainer"]
