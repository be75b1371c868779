"""Models the tutorials train. Each is an ordinary ``nn.Module``; parallel versions live with
their technique, and are checked against these serial twins."""

from cai_labs.models.gpt import GPT, Block, GPTConfig
from cai_labs.models.mlp import MLP

__all__ = ["MLP", "GPT", "GPTConfig", "Block"]
