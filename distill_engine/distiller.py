"""HiddenStateDistiller: feature distillation between two models of different width and depth.

Holds one learned projection (an ``nn.Linear(d_s, d_t)``) per mapped (student layer, teacher layer) pair
and returns the weighted sum of the pairs' :func:`fused_projection_loss` values.

Layer numbering: layer i is the output of transformer block i (0-based), i.e. ``hidden_states[i + 1]`` of
a forward with ``output_hidden_states=True``: index 0 of that tuple is the embedding output and is never
mapped. A model with L layers therefore returns L + 1 hidden states. (In Hugging Face models the last
entry is usually taken after the final norm, so layer L − 1 means the normed final state.)

Layer maps:

* ``"uniform"``: student layer i → teacher layer round((i + 1)·L_t / L_s) − 1 for every student layer
  (rounding half up, and never below teacher layer 0), so the last student layer meets the last teacher
  layer and the others spread evenly. With L_s = 2, L_t = 4: (0, 1), (1, 3).
* an explicit list of ``(student_layer, teacher_layer)`` pairs, e.g. ``[(0, 1), (1, 3)]``.

The module imports no ``transformers``: :meth:`HiddenStateDistiller.from_configs` only reads the
``hidden_size`` and ``num_hidden_layers`` attributes of the two configs.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .ops.projection_loss import KINDS, fused_projection_loss
from ._backend import BACKENDS
from ._validate import check_choice

LayerMap = Union[str, Sequence[Tuple[int, int]]]

__all__ = ["HiddenStateDistiller", "uniform_layer_map"]


def uniform_layer_map(student_layers: int, teacher_layers: int) -> List[Tuple[int, int]]:
    """Student layer i → teacher layer round((i + 1)·L_t / L_s) − 1 (half up, clamped at 0)."""
    _check_count("student_layers", student_layers)
    _check_count("teacher_layers", teacher_layers)
    pairs = []
    for i in range(student_layers):
        # round half up in integer arithmetic: floor((2(i+1)L_t + L_s) / (2 L_s))
        r = (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers)
        pairs.append((i, max(r, 1) - 1))
    return pairs


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normalize_map(layer_map: LayerMap, L_s: int, L_t: int) -> List[Tuple[int, int]]:
    if isinstance(layer_map, str):
        if layer_map != "uniform":
            raise ValueError(f"layer_map must be 'uniform' or a list of (student_layer, teacher_layer) pairs, "
                             f"got {layer_map!r}")
        return uniform_layer_map(L_s, L_t)
    try:
        items = list(layer_map)
    except TypeError:
        raise ValueError(f"layer_map must be 'uniform' or a list of (student_layer, teacher_layer) pairs, "
                         f"got {type(layer_map).__name__}") from None
    if not items:
        raise ValueError("layer_map is empty; give at least one (student_layer, teacher_layer) pair or 'uniform'")
    pairs = []
    for k, p in enumerate(items):
        try:
            s, t = p
        except (TypeError, ValueError):
            raise ValueError(f"layer_map[{k}] must be a (student_layer, teacher_layer) pair, got {p!r}") from None
        for who, v in (("student", s), ("teacher", t)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"layer_map[{k}] = {p!r}: the {who} layer must be an int, got {v!r}")
        if not 0 <= s < L_s:
            raise ValueError(f"layer_map[{k}] = {p!r}: student layer {s} is outside the student's {L_s} layers "
                             f"(valid 0..{L_s - 1}; layer i is hidden_states[i + 1])")
        if not 0 <= t < L_t:
            raise ValueError(f"layer_map[{k}] = {p!r}: teacher layer {t} is outside the teacher's {L_t} layers "
                             f"(valid 0..{L_t - 1}; layer i is hidden_states[i + 1])")
        if (s, t) in pairs:
            raise ValueError(f"layer_map[{k}] = {p!r} repeats an earlier pair; use weights to weigh a pair more")
        pairs.append((s, t))
    return pairs


def _hidden_tuple(name: str, states, L: int) -> Sequence[torch.Tensor]:
    if hasattr(states, "hidden_states"):  # a model output object
        states = states.hidden_states
    if states is None or isinstance(states, torch.Tensor) or not isinstance(states, (list, tuple)):
        raise ValueError(f"{name} must be the tuple of hidden states of a forward with output_hidden_states=True "
                         f"(outputs.hidden_states), got {type(states).__name__}")
    if len(states) != L + 1:
        raise ValueError(f"{name} has {len(states)} entries but the model has {L} layers: expected {L + 1} "
                         f"(the embedding output, then one per layer), as returned with output_hidden_states=True")
    return states


class HiddenStateDistiller(nn.Module):
    """Learned projections and fused losses for (student layer, teacher layer) pairs.

    Args:
        student_hidden_size, teacher_hidden_size: d_s and d_t.
        student_layers, teacher_layers: L_s and L_t (number of transformer blocks).
        layer_map: "uniform" or a list of (student_layer, teacher_layer) pairs (0-based block indices).
        weights: optional per-pair loss weights (finite, >= 0), default 1.0 each.
        kind: "mse" or "cosine" (see :func:`distill_engine.fused_projection_loss`).
        bias: give each projection a bias.
        backend: backend of the fused loss.
        device, dtype: of the projections.

    forward(student_hidden_states, teacher_hidden_states, attention_mask=None) returns
    Σ_pairs weight · fused_projection_loss(h_s[layer_s], P, h_t[layer_t], mask=attention_mask), each term a
    mean over the unmasked tokens. The student states are cast to the projections' dtype (the gradient
    still reaches the student); the teacher states are detached and cast too.
    """

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int, student_layers: int, teacher_layers: int, *,
                 layer_map: LayerMap = "uniform", weights: Optional[Iterable[float]] = None, kind: str = "mse",
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, v in (("student_hidden_size", student_hidden_size), ("teacher_hidden_size", teacher_hidden_size),
                        ("student_layers", student_layers), ("teacher_layers", teacher_layers)):
            _check_count(name, v)
        check_choice("kind", kind, KINDS)
        check_choice("backend", backend, BACKENDS)
        self.student_hidden_size, self.teacher_hidden_size = student_hidden_size, teacher_hidden_size
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.kind, self.backend = kind, backend
        self.layer_pairs: Tuple[Tuple[int, int], ...] = tuple(_normalize_map(layer_map, student_layers, teacher_layers))
        if weights is None:
            w = [1.0] * len(self.layer_pairs)
        else:
            w = list(weights)
            if len(w) != len(self.layer_pairs):
                raise ValueError(f"weights has {len(w)} entries but the layer map has {len(self.layer_pairs)} pairs "
                                 f"{list(self.layer_pairs)}")
            for k, x in enumerate(w):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    raise ValueError(f"weights[{k}] must be a finite number >= 0, got {x!r}")
        self.pair_weights: Tuple[float, ...] = tuple(float(x) for x in w)
        self.projections = nn.ModuleList(
            nn.Linear(student_hidden_size, teacher_hidden_size, bias=bias, device=device, dtype=dtype)
            for _ in self.layer_pairs)

    @classmethod
    def from_configs(cls, student_config, teacher_config, **kwargs) -> "HiddenStateDistiller":
        """Sizes from two (Hugging Face style) configs: ``hidden_size`` and ``num_hidden_layers``."""
        sizes = []
        for who, cfg in (("student_config", student_config), ("teacher_config", teacher_config)):
            for attr in ("hidden_size", "num_hidden_layers"):
                if not hasattr(cfg, attr):
                    raise ValueError(f"{who} has no attribute {attr!r}; build the distiller with explicit sizes instead")
                sizes.append(getattr(cfg, attr))
        return cls(sizes[0], sizes[2], sizes[1], sizes[3], **kwargs)

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, **kwargs) -> "HiddenStateDistiller":
        """Sizes from two models' ``.config``."""
        return cls.from_configs(getattr(student, "config", None), getattr(teacher, "config", None), **kwargs)

    def pair_losses(self, student_hidden_states, teacher_hidden_states,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The unweighted loss of each pair, [num_pairs] float32."""
        hs = _hidden_tuple("student_hidden_states", student_hidden_states, self.student_layers)
        ht = _hidden_tuple("teacher_hidden_states", teacher_hidden_states, self.teacher_layers)
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            lead = tuple(hs[1].shape[:-1])
            if tuple(attention_mask.shape) != lead:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the hidden states have "
                                 f"leading shape {lead}")
            if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
                raise ValueError(f"attention_mask must be bool or integer (1 = real token), got {attention_mask.dtype}")
            mask = attention_mask != 0
        losses = []
        for (s, t), proj in zip(self.layer_pairs, self.projections):
            w = proj.weight
            h_s = hs[s + 1]
            h_t = ht[t + 1]
            if tuple(h_t.shape[:-1]) != tuple(h_s.shape[:-1]):
                raise ValueError(f"student layer {s} has states of shape {tuple(h_s.shape)} but teacher layer {t} has "
                                 f"{tuple(h_t.shape)}; the two models must see the same batch of tokens")
            if mask is not None and mask.device != h_s.device:
                mask = mask.to(h_s.device)
            losses.append(fused_projection_loss(
                h_s.to(w.dtype), w, h_t.detach().to(device=h_s.device, dtype=w.dtype), proj_bias=proj.bias,
                kind=self.kind, mask=mask, reduction="mean", backend=self.backend))
        return torch.stack(losses)

    def forward(self, student_hidden_states, teacher_hidden_states,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        losses = self.pair_losses(student_hidden_states, teacher_hidden_states, attention_mask)
        weights = torch.tensor(self.pair_weights, dtype=losses.dtype, device=losses.device)
        return (losses * weights).sum()

    def extra_repr(self) -> str:
        return (f"d_s={self.student_hidden_size}, d_t={self.teacher_hidden_size}, layers={self.student_layers}->"
                f"{self.teacher_layers}, pairs={list(self.layer_pairs)}, weights={list(self.pair_weights)}, "
                f"kind={self.kind!r}")
