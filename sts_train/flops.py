"""Analytic FLOPs of a LLaVA step (multiply-add = 2 FLOPs), attention included.

``FlopCounterMode`` misses the CPU SDPA kernel and misplaces backward FLOPs (DESIGN.md), so
the toolkit counts analytically. Per decoder layer and sequence of ``S`` tokens (hidden ``H``,
``h`` query heads and ``k`` key/value heads of size ``d``, MLP width ``I``)::

    proj = 2*S*H*(h*d) * 2 + 2*S*H*(k*d) * 2       # q, o and k, v projections
    attn = 2*S*S*h*d * 2                            # scores and weighted sum, full S x S
    mlp  = 2*S*H*I * 3                              # gate, up, down (SwiGLU)

Attention is counted as full ``S x S`` because that is what the kernels compute with a mask.
Backward: 2x forward for layers with trained weights, 1x for frozen layers that still pass
gradients to earlier trained parts (the projector), 0 for the frozen vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerDims:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, parts) -> "LayerDims":
        return cls(parts.hidden_size, parts.intermediate_size, parts.num_heads,
                   parts.num_kv_heads, parts.head_dim, parts.vocab_size)


def layer_flops_fwd(seq_len: int, dims: LayerDims, batch: int = 1) -> dict[str, float]:
    """Forward FLOPs of one decoder layer on ``batch`` sequences of ``seq_len`` tokens.

    Returns:
        ``{"proj": ..., "attention": ..., "mlp": ..., "total": ...}``.
    """
    s, h = seq_len, dims.hidden_size
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    proj = 2 * s * h * q_width * 2 + 2 * s * h * kv_width * 2
    attention = 2 * s * s * q_width * 2
    mlp = 2 * s * h * dims.intermediate_size * 3
    out = {"proj": proj * batch, "attention": attention * batch, "mlp": mlp * batch}
    out["total"] = sum(out.values())
    return out


def lm_head_flops_fwd(seq_len: int, dims: LayerDims, batch: int = 1) -> float:
    return 2.0 * seq_len * dims.hidden_size * dims.vocab_size * batch


def llm_step_flops(
    seq_lens: list[int],
    dims: LayerDims,
    *,
    num_layers: int,
    skipped_layers: int = 0,
    llm_trainable: bool = True,
) -> float:
    """Training FLOPs (forward + backward) of the LLM part of one micro-batch.

    Args:
        seq_lens: the padded sequence length of each row (rows run at the padded length).
        skipped_layers: how many decoder layers are skipped (no forward, no backward).
        llm_trainable: weight gradients are computed (instruction stage) or not (alignment).
    """
    backward_factor = 2.0 if llm_trainable else 1.0
    per_layer = sum(layer_flops_fwd(s, dims)["total"] for s in seq_lens)
    head = sum(lm_head_flops_fwd(s, dims) for s in seq_lens)
    layers = (num_layers - skipped_layers) * per_layer
    return (1.0 + backward_factor) * (layers + head)
