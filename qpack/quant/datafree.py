"""Data-free sensitivity: how the budget solver weighs one tensor's quantization error when no calibration data
(so no Hessian) is given.

  * "mse": 0.5 * ||W - Wq||^2, the raw squared error; tensors of large weights dominate it, so the solver
    starves small-weight tensors that matter as much to the model's output.
  * "relative": the squared error over the block's mean square weight, 0.5 * ||W - Wq||^2 /
    mean(W^2) = 0.5 * numel * ||W - Wq||^2 / ||W||^2: every parameter's error in units of its own tensor's
    scale, i.e. the output error of a linear layer relative to its output energy for white inputs, counted
    per parameter. It allocates like SDClip (one step in units of each row's spread) but lets the solver
    trade where that pays.
  * "relative+embed" (the default): "relative" for the block matrices; the token embedding / output head
    (names matching EMBED_NAME) counts its squared error in units of the matrices' typical mean square
    (the median over the non-embedding tensors, `reference_ms`), times EMBED_WEIGHT. An embedding whose
    weights are large next to the matrices' (our checkpoints: 11-14x their mean square) dominates the
    residual stream and the tied logits, and starving it costs most; one with small weights (SmolLM2:
    0.5x) is no more sensitive than a matrix. Measured in benchmarks/datafree: a fixed factor cannot serve
    both (32 is best on our checkpoints and worst on SmolLM2, 1 the reverse).
  * "model+embed": "relative+embed" with each quantized block's squared error taken from the high-rate model
    (numel * mean(scale^2) / 12, from the block's stored steps) instead of measured (the measured error where it
    is larger, which is where a clip cut weights). The solver then equalizes
    steps in units of each block's scale (SDClip's one k for every row, with the embedding's factor) and only
    bends that where the rate curves do, instead of chasing the measured error's idiosyncrasies, which do not
    predict the model's loss. Measured on SmolLM2 it bends them anyway (ffn_down a step coarser) and scores no
    better than "relative+embed".
  * "common": no trades at all (qpack.rd.common_step): one step for every block in units of its rows' std, the
    embedding's finer by common_step_divisor, bisected to the largest estimated size that fits; the solver picks,
    per block, only among that step and two finer ones 1/32 octave apart (by the "model+embed" loss) to fill
    the budget. On SmolLM2 one common step beat every allocation a data-free loss made (benchmarks/datafree).

Columns of a tied embedding / output head (`head_columns`): the head multiplies the final norm's output, whose
feature j carries that norm's gain gamma_j, so an error in column j of the head costs more where |gamma_j| is large.
Under every loss but "mse" such a tensor's squared error counts |gamma_j| / mean |gamma| per column, and its uniform
steps are column-scaled to match (qpack.quant.uniform.col_factors: steps ~ |gamma_j|^-1/2). The exponent is tempered
(gamma^2 would be the head's own sensitivity) because a tied matrix is also the input embedding, whose errors no gain
scales; on SmolLM2 at SDClip's bytes |gamma|^-1/2 steps measured best of |gamma|^-1/4 .. |gamma|^-1
(benchmarks/datafree).
A model without such a gain (qpack's own GPT: RMSNorm without weight) is unchanged.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ..errors import QpackInputError
from .base import Quantized, as_matrix

DATAFREE_LOSSES = ("relative", "relative+embed", "model+embed", "common", "mse")
#: "common": the embedding's step is divided by max(1, its mean square over the matrices' median) to this power;
#: SmolLM2 (0.5x the matrices' mean square) then keeps the matrices' step, our checkpoints' embeddings (11-14x)
#: get one 6-7x finer
COMMON_EMBED_EXPONENT = 0.75
EMBED_NAME = re.compile(r"(emb|wte|lm_head)", re.I)
#: the norm before the output head: GGUF "output_norm", Hugging Face Llama "model.norm", GPT-2 / nanoGPT "ln_f"
HEAD_NORM_NAME = re.compile(r"^(?:model\.|transformer\.|decoder\.)?(?:output_norm|norm|ln_f|final_norm|final_layernorm|"
                            r"norm_f)\.weight$")
#: an untied output head next to the embedding (GGUF "output.weight"): then the embedding is input-only
UNTIED_HEAD_NAME = re.compile(r"^(?:output|lm_head|model\.output)\.weight$")
EMBED_WEIGHT = 3.0
DEFAULT_DATAFREE_LOSS = "relative+embed"


def check_datafree_loss(mode: str) -> str:
    """`mode` if it names a data-free loss, else a QpackInputError."""
    if mode not in DATAFREE_LOSSES:
        raise QpackInputError(f"data-free loss must be one of {', '.join(DATAFREE_LOSSES)}, got {mode!r}")
    return mode


def _ms(w: torch.Tensor) -> float:
    return float(as_matrix(w).to(torch.float64).square().mean())


def reference_ms(tensors: Mapping[str, torch.Tensor]) -> float | None:
    """The median mean square weight of the non-embedding tensors (None when there are none)."""
    ms = sorted(_ms(t) for n, t in tensors.items() if not EMBED_NAME.search(n))
    return ms[len(ms) // 2] if ms else None


def head_columns(tensors: Mapping[str, torch.Tensor], quantized: list[str]) -> dict[str, torch.Tensor]:
    """{name: |gamma|} for the one tied embedding / output head among `quantized` whose columns a final norm's gain
    `gamma` (a 1-D tensor named like HEAD_NORM_NAME, one per column) scales; {} when there is none, when there are
    several candidates, or when an untied head is stored (quantized) beside the embedding; a tied alias is not."""
    embeds = [n for n in quantized if EMBED_NAME.search(n)]
    if len(embeds) != 1 or any(UNTIED_HEAD_NAME.search(n) and n != embeds[0] for n in quantized):
        return {}
    cols = as_matrix(tensors[embeds[0]]).shape[1]
    gains = [t for n, t in tensors.items() if HEAD_NORM_NAME.search(n) and t.ndim == 1 and t.numel() == cols
             and t.is_floating_point()]
    if len(gains) != 1:
        return {}
    g = gains[0].detach().to(torch.float64).abs()
    if not bool(torch.isfinite(g).all()) or float(g.max()) <= 0 or float(g.min()) == float(g.max()):
        return {}  # no gain, or one gain for every feature: nothing to tell the columns apart
    return {embeds[0]: g}


def datafree_weight(w: torch.Tensor, mode: str, name: str = "", ref_ms: float | None = None) -> float:
    """The factor on 0.5 * squared error for a block of weights `w` (of the tensor `name`) under `mode`;
    `ref_ms` is reference_ms of the model's quantized tensors (None: the block's own mean square)."""
    if check_datafree_loss(mode) == "mse":
        return 1.0
    ms = _ms(w)
    if mode in ("relative+embed", "model+embed", "common") and EMBED_NAME.search(name):
        ms = ref_ms if ref_ms else ms
        return EMBED_WEIGHT / ms if ms > 0 else EMBED_WEIGHT
    return 1.0 / ms if ms > 0 else 1.0


def common_step_divisor(w: torch.Tensor, name: str, ref_ms: float | None) -> float:
    """How much finer than the common step tensor `name` is stored under data-free loss "common": 1 for a block
    matrix, max(1, mean square / ref_ms) ** COMMON_EMBED_EXPONENT for the embedding / output head."""
    if not EMBED_NAME.search(name) or not ref_ms:
        return 1.0
    return max(1.0, _ms(w) / ref_ms) ** COMMON_EMBED_EXPONENT


def modeled_sq_error(q: Quantized) -> float:
    """The high-rate model of a quantized block's summed squared error: numel * mean(step^2) / 12 (every group
    of a row holds the same number of weights, so the mean over the scales is the mean over the weights)."""
    return float(q.q.numel()) * float(q.scales.to(torch.float64).square().mean()) / 12.0


def datafree_loss(w: torch.Tensor, wq: torch.Tensor, mode: str, name: str = "", ref_ms: float | None = None,
                  payload: Quantized | torch.Tensor | None = None, col_weight: torch.Tensor | None = None) -> float:
    """The solver's loss for replacing the block `w` (of the tensor `name`) by `wq` with no data; under
    "model+embed" and "common" a quantized `payload` (the block as stored) gives the modeled error where it is
    larger; `col_weight` (head_columns) weighs column j's error by col_weight[j] / mean(col_weight)."""
    d = (as_matrix(w).to(torch.float64) - as_matrix(wq).to(torch.float64)).square()
    if col_weight is not None and mode != "mse":
        cw = col_weight.to(torch.float64).reshape(1, -1).to(d.device)
        d = d * (cw / cw.mean())
    e = float(d.sum())
    if mode in ("model+embed", "common") and isinstance(payload, Quantized) and col_weight is None:
        e = max(e, modeled_sq_error(payload))  # the measured error still counts where it is larger: clipping
    return 0.5 * e * datafree_weight(w, mode, name, ref_ms)
