"""Model shapes for the scale model: published configurations, cited, and custom shapes.

A transformer is given by its layers ``L``, width ``h``, heads ``a`` (``kv_heads`` for grouped-
query attention), MLP width ``f`` (``gated``: SwiGLU's two input projections), vocabulary ``V``
and sequence length. Parameter and FLOP counts follow from the shape. A model that is not a
transformer stack (ResNet-50, the Stable Diffusion UNet) is given by its published parameter
count and forward FLOPs per sample; its activations are not modeled (reported as such).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["ModelShape", "MODELS", "get_model", "custom_model"]


@dataclass(frozen=True)
class ModelShape:
    """One model. ``source`` cites where the numbers come from."""

    name: str
    layers: int = 0
    hidden: int = 0
    heads: int = 0
    kv_heads: int | None = None
    ffn: int | None = None
    vocab: int = 0
    seq: int = 2048
    gated: bool = False
    bias: bool = True
    tied: bool = True
    learned_positions: bool = True
    dropout: bool = True
    #: for non-transformer models: parameters and forward FLOPs of one sample
    params: int | None = None
    forward_flops: float | None = None
    source: str = ""

    @property
    def is_transformer(self) -> bool:
        return self.params is None

    @property
    def f(self) -> int:
        return 4 * self.hidden if self.ffn is None else self.ffn

    @property
    def kv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def qkv_out(self) -> int:
        """Output features of the fused QKV projection: ``h + 2 kv d_head``."""
        return self.hidden + 2 * self.kv * self.head_dim

    def layer_matmul_params(self) -> int:
        """Weights of one layer's linears (QKV, output, MLP), biases excluded."""
        h = self.hidden
        return h * self.qkv_out + h * h + (3 if self.gated else 2) * h * self.f

    def layer_params(self) -> int:
        """All parameters of one layer: linears, their biases, two norms."""
        if not self.is_transformer:
            raise ValueError(f"{self.name} is not a transformer stack")
        h = self.hidden
        biases = (self.qkv_out + h + (2 if self.gated else 1) * self.f + h) if self.bias else 0
        norms = 2 * (2 * h if self.bias else h)  # LayerNorm weight+bias, or RMSNorm weight
        return self.layer_matmul_params() + biases + norms

    def embedding_params(self) -> int:
        """Token embedding (and learned positions)."""
        return self.vocab * self.hidden + (self.seq * self.hidden if self.learned_positions else 0)

    def head_params(self) -> int:
        """Final norm and, if untied, the output projection."""
        norm = 2 * self.hidden if self.bias else self.hidden
        return norm + (0 if self.tied else self.vocab * self.hidden)

    def total_params(self) -> int:
        if not self.is_transformer:
            return self.params
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params()

    def kv_cache_bytes_per_token(self, elem: int = 2) -> int:
        """Bytes of keys and values one token leaves in the cache: ``2 L kv d_head elem``."""
        return 2 * self.layers * self.kv * self.head_dim * elem

    def forward_flops_per_token(self, seq: int) -> float | None:
        """Forward FLOPs per token (Narayanan et al. 2021, eq. 3 generalised): ``2`` per weight
        of each linear, ``4 s h`` per layer for the attention scores and their product with
        ``V``, and ``2 h V`` for the logits. ``None`` where no count is published."""
        if not self.is_transformer:
            return self.forward_flops
        per_layer = 2 * self.layer_matmul_params() + 4 * seq * self.hidden
        return self.layers * per_layer + 2 * self.hidden * self.vocab


# The presets are built at import, before mutation testing activates a mutant, so a mutant of
# these two could never run: they are checked against the Hugging Face classes instead
# (tests/test_scale_closed_forms.py).
# pragma: no mutate start
def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    return ModelShape(
        name,
        layers,
        hidden,
        heads,
        vocab=50272,
        seq=2048,
        source="Zhang et al. 2022, OPT: Open Pre-trained Transformer Language Models, Table 1",
    )


def _llama(name: str, layers: int, hidden: int, heads: int, ffn: int) -> ModelShape:
    return ModelShape(
        name,
        layers,
        hidden,
        heads,
        kv_heads=8,
        ffn=ffn,
        vocab=128256,
        seq=8192,
        gated=True,
        bias=False,
        tied=False,
        learned_positions=False,
        dropout=False,
        source="Llama Team 2024, The Llama 3 Herd of Models, Table 3",
    )


# pragma: no mutate end


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in [
        _opt("opt-125m", 12, 768, 12),
        _opt("opt-1.3b", 24, 2048, 32),
        _opt("opt-6.7b", 32, 4096, 32),
        _opt("opt-13b", 40, 5120, 40),
        _opt("opt-30b", 48, 7168, 56),
        _opt("opt-66b", 64, 9216, 72),
        _opt("opt-175b", 96, 12288, 96),
        ModelShape(
            "gpt-3-175b",
            96,
            12288,
            96,
            vocab=50257,
            seq=2048,
            source="Brown et al. 2020, Language Models are Few-Shot Learners, Table 2.1",
        ),
        _llama("llama-3-8b", 32, 4096, 32, 14336),
        _llama("llama-3-70b", 80, 8192, 64, 28672),
        _llama("llama-3-405b", 126, 16384, 128, 53248),
        ModelShape(
            "bert-large",
            24,
            1024,
            16,
            vocab=30522,
            seq=512,
            source="Devlin et al. 2019, BERT, section 3 (L=24, H=1024, A=16)",
        ),
        ModelShape(
            "resnet-50",
            params=25_557_032,
            forward_flops=2 * 4.09e9,
            seq=1,
            source="He et al. 2016 (ResNet-50); torchvision's model table: 25,557,032 "
            "parameters, 4.09 G multiply-adds per 224x224 image",
        ),
        ModelShape(
            "sd-1.5-unet",
            params=860_000_000,
            seq=1,
            source="Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion "
            "Models: the 860M-parameter UNet of Stable Diffusion v1 (FLOPs not modeled)",
        ),
    ]
}


def get_model(name: str) -> ModelShape:
    """A preset by name, with a clear error listing the presets."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(MODELS)} or give a custom shape "
            "(--layers --hidden --heads --kv-heads --ffn --vocab)"
        ) from None


def custom_model(
    layers: int,
    hidden: int,
    heads: int,
    vocab: int,
    *,
    kv_heads: int | None = None,
    ffn: int | None = None,
    seq: int = 2048,
    base: ModelShape | None = None,
) -> ModelShape:
    """A transformer of any shape (GPT-style unless ``base`` gives the other choices)."""
    for what, v in (("layers", layers), ("hidden", hidden), ("heads", heads), ("vocab", vocab)):
        if v < 1:
            raise ValueError(f"{what} must be a positive integer; got {v}")
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}; change either")
    if kv_heads is not None and heads % kv_heads:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads}; change either")
    b = base or ModelShape("custom")
    return replace(
        b,
        name="custom",
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        ffn=ffn,
        vocab=vocab,
        seq=seq,
        source="custom shape",
    )
