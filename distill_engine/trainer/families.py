"""Model families (issue 12): fresh models of any causal-LM type, each family's logit transform, and the
logits guard.

* :func:`init_config` builds ``student.init`` / ``teacher.init`` through the config class of its
  ``model_type`` (default "llama"), refusing keys that class does not know.
* :func:`logit_transform` maps a config to the ``(logit_scale, softcap)`` of the fused ops **by model_type**,
  because one key means different things in different families (``logits_scaling``: Granite divides the
  logits by it, HyperCLOVA X multiplies, MiniCPM3 divides the hidden states). A transform key set on a
  family this table does not know raises, naming the model type and key.
* :func:`check_logits_path` is the guard against what no table can foresee: on the first micro-batch the
  engine's path (base model → last hidden state → lm_head weight and bias → transform) must reproduce
  ``model(...).logits`` on a few rows within the dtype's tolerance.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional, Tuple

import torch
from torch import nn

# model_type → how its HF forward turns lm_head(h) into logits: (kind, config key)
#   "softcap": z = c·tanh(l/c) with c = key (None: no capping)   "mul": z = key·l   "div": z = l / key
#   "hidden_div": lm_head(h / key) — the same as l / key for a head without bias
_FAMILY_TRANSFORMS = {
    **{t: ("softcap", "final_logit_softcapping") for t in
       ("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "vaultgemma",
        "nanochat")},
    **{t: ("mul", "logit_scale") for t in ("cohere", "cohere2", "cohere2_moe")},
    **{t: ("div", "logits_scaling") for t in
       ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa")},
    "falcon_h1": ("mul", "lm_head_multiplier"),
    "minicpm3": ("hidden_div", "logits_scaling"),
    "hyperclovax": ("mul", "logits_scaling"),
}
# keys that transform the logits in some family; set on a family outside the table above → refused
_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                   "lm_head_multiplier", "output_multiplier", "logit_softcapping")
_NEUTRAL = (None, 0, 0.0, 1, 1.0, False)


def _causal_lm_types():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _known_keys(config_cls) -> set:
    from transformers import PretrainedConfig

    keys = set(config_cls().to_dict())
    for cls in (config_cls, PretrainedConfig):
        keys |= {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}
    keys |= set(getattr(config_cls, "attribute_map", {}) or {})
    return keys


def init_config(init: dict, key: str):
    """The config of a fresh model from an ``init`` dict: ``model_type`` (default "llama") picks the class."""
    from transformers import CONFIG_MAPPING

    if not isinstance(init, dict):
        raise ValueError(f"{key}.init must be a mapping of config keys, got {type(init).__name__}")
    kw = dict(init)
    mt = kw.pop("model_type", "llama")
    lm_types = _causal_lm_types()
    if mt not in CONFIG_MAPPING or mt not in lm_types:
        raise ValueError(f"{key}.init.model_type={mt!r} is not a causal-LM model type of the installed transformers; "
                         f"use one of e.g. {', '.join(sorted(lm_types)[:12])}, ...")
    cls = CONFIG_MAPPING[mt]
    known = _known_keys(cls)
    unknown = sorted(set(kw) - known)
    if unknown:
        import difflib

        hints = [f"did you mean {m[0]!r} for {k!r}?" for k in unknown
                 if (m := difflib.get_close_matches(k, known, n=1))]
        raise ValueError(f"{key}.init: {', '.join(unknown)} not known to {cls.__name__} (model_type {mt!r})"
                         f"{' (' + '; '.join(hints) + ')' if hints else ''}; fix the spelling or drop them")
    try:
        return cls(**kw)
    except Exception as e:  # TypeError, ValueError, huggingface_hub's strict-dataclass validation errors
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"{key}.init: not a valid {cls.__name__} ({msg})") from None


def model_from_config(cfg) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg)


def supported_attn(cfg, attn: str) -> str:
    """``attn`` unless it is "sdpa" and the family's class has no SDPA path (Gemma 2: soft-capped attention
    scores) — then "eager", which every family has. ``resolve_attn("auto")`` picks "sdpa" on CPU."""
    if attn != "sdpa":
        return attn
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(cfg), None)
    return "eager" if cls is not None and not getattr(cls, "_supports_sdpa", True) else attn


def logit_transform(config, key: str) -> Tuple[Optional[float], Optional[float]]:
    """(logit_scale, softcap) for the fused ops from a model config, by model_type; raises for unknown ones."""
    mt = getattr(config, "model_type", "?")
    texts = [config]
    if hasattr(config, "get_text_config"):
        tc = config.get_text_config()
        if tc is not config:
            texts.append(tc)
    fam = _FAMILY_TRANSFORMS.get(mt)
    if fam is None and len(texts) > 1:
        fam = _FAMILY_TRANSFORMS.get(getattr(texts[1], "model_type", None))
    if fam is None:
        for c in texts:
            for attr in _TRANSFORM_KEYS:
                val = getattr(c, attr, None)
                if val not in _NEUTRAL:
                    raise ValueError(f"{key}: model type {mt!r} sets {attr}={val!r}, a logit transform distill-engine "
                                     f"does not implement for this family (the fused loss would miss it)")
        return None, None
    kind, attr = fam
    val = next((getattr(c, attr) for c in reversed(texts) if getattr(c, attr, None) is not None), None)
    if val is None or (kind != "softcap" and float(val) == 1.0):
        return None, None
    val = float(val)
    if kind == "softcap":
        return None, val
    if kind == "mul":
        return val, None
    if val == 0.0:
        raise ValueError(f"{key}: model type {mt!r} has {attr}=0, which its forward divides by")
    return 1.0 / val, None  # "div" and "hidden_div"


# ----------------------------------------------------------------------------------------------
# the logits guard
# ----------------------------------------------------------------------------------------------
def engine_logits(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """[B, L, V] fp32 logits the engine's way: base model → hidden → lm_head weight/bias → transform."""
    from ..teacher.colocated import base_model_of, lm_head_of

    out = base_model_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
    h = out.last_hidden_state.float()
    head = lm_head_of(model)
    b = getattr(head, "bias", None)
    params = [p for p in (head.weight, b) if p is not None]
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: the head is partitioned outside its own forward
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with ctx:
        z = h @ head.weight.float().t()
        if b is not None:
            z = z + b.float()
    s, c = logit_transform(model.config, "model")
    if s is not None:
        z = z * s
    if c is not None:
        z = c * torch.tanh(z / c)
    return z


_GUARD_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}


@torch.no_grad()
def check_logits_path(model: nn.Module, input_ids, attention_mask, *, key: str, rows: int = 2,
                      positions: int = 32) -> None:
    """Stop with a one-line error when the engine's logits path does not reproduce ``model(...).logits``.

    Compares log-softmaxes (what the loss sees) of the first ``positions`` tokens of ``rows`` sequences (causal:
    a prefix is a valid input; it keeps the [rows, positions, V] logits small for any model), in the model's
    dtype tolerance (fp32 1e-3, half precision 5e-2 relative to the logits' range). Run on every rank (the
    model call is collective under ZeRO-3).
    """
    ids = input_ids[:rows, :positions]
    am = attention_mask[:rows, :positions] if attention_mask is not None else None  # None: packed, causal
    was_training = model.training
    model.eval()  # dropout off: both paths must be deterministic
    try:
        ref = model(input_ids=ids, attention_mask=am, use_cache=False, return_dict=True).logits.float()
        got = engine_logits(model, ids, am)
    finally:
        model.train(was_training)
    if got.shape != ref.shape:
        raise ValueError(f"{key}: model type {getattr(model.config, 'model_type', '?')!r}: the engine's logits have "
                         f"shape {tuple(got.shape)}, the model's {tuple(ref.shape)}; distill-engine cannot train it")
    m = am.bool() if am is not None else torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if not bool(torch.isfinite(ref[m]).all()):
        return  # non-finite weights or inputs: the trainer's non-finite stop names the step and the cause
    lg, lr = torch.log_softmax(got, -1)[m], torch.log_softmax(ref, -1)[m]  # [n, V] real positions only
    dtype = next(model.parameters()).dtype
    tol = _GUARD_TOL.get(dtype, 5e-2) * max(1.0, float(ref[m].abs().max()) if m.any() else 1.0)
    err = float((lg - lr).abs().max()) if m.any() else 0.0
    if not err <= tol:
        raise ValueError(f"{key}: model type {getattr(model.config, 'model_type', '?')!r}: the engine's logits path "
                         f"(base model → lm_head → transform) differs from model(...).logits by {err:.3g} (> {tol:.3g}); "
                         f"the model applies an output transform distill-engine does not know — it cannot be used")


# ----------------------------------------------------------------------------------------------
# MoE students: the router's load-balancing loss
# ----------------------------------------------------------------------------------------------
def router_aux_spec(model: nn.Module):
    """(loss_fn, num_experts, top_k, coef) when the HF forward would add a router auxiliary loss
    (``config.output_router_logits`` on), else None. The engine's forward stops at the base model, so the
    trainer adds coef · aux itself (student.py) with the family's own ``load_balancing_loss_func``."""
    import sys

    cfg = model.config
    if not getattr(cfg, "output_router_logits", False):
        return None
    mt = getattr(cfg, "model_type", "?")
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    E = getattr(model, "num_experts", None) or getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    k = getattr(model, "num_experts_per_tok", None) or getattr(cfg, "num_experts_per_tok", None)
    coef = getattr(model, "router_aux_loss_coef", None)
    coef = getattr(cfg, "router_aux_loss_coef", None) if coef is None else coef
    if fn is None or E is None or k is None or coef is None:
        raise ValueError(f"student: model type {mt!r} has output_router_logits on, but distill-engine cannot find its "
                         f"router loss (load_balancing_loss_func, num_experts, num_experts_per_tok, "
                         f"router_aux_loss_coef); set output_router_logits: false to train without it")
    return fn, int(E), int(k), float(coef)
