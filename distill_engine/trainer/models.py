"""Loading the student and the frozen teacher (Hugging Face causal LMs from local paths, or tiny models built
from a config dict), with transformers' ZeRO-3 loading switch kept strictly around the student's load.

The trap. transformers keeps one *process-wide* ZeRO-3 flag (a weak reference set by ``HfDeepSpeedConfig``).
While it is set, every ``from_pretrained`` builds its model inside ``deepspeed.zero.Init`` and loads the
weights into partitions. A teacher loaded while it is still set comes back partitioned (its weights are empty
tensors outside a gathered region — "'weight' must be 2-D"), or, when the loader's partition path does not
match it, silently at its random initial values. Here the flag is set only inside :func:`zero3_loading`,
around the student's load, and cleared in a ``finally``; the teacher is loaded plainly (or under its own
ZeRO-3 inference config), and :func:`verify_weights` compares a loaded teacher tensor with the checkpoint file.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
from torch import nn

from ..loading import load_causal_lm, load_config

class _Zero3Switch:
    """What transformers' loading code asks of its (weakly referenced) DeepSpeed config object."""

    def __init__(self, ds_config: dict):
        self.config = ds_config

    def is_zero3(self) -> bool:
        return int(self.config.get("zero_optimization", {}).get("stage", 0)) == 3


@contextlib.contextmanager
def zero3_loading(ds_config: Optional[dict]):
    """Within the block, ``from_pretrained`` loads ZeRO-3 partitioned models (``ds_config``); outside, never."""
    import sys

    if ds_config is None:
        hf_ds = sys.modules.get("transformers.integrations.deepspeed")
        if hf_ds is not None:  # whoever set the switch imported this module; nothing to undo otherwise
            hf_ds.unset_hf_deepspeed_config()
        yield
        return
    from transformers.integrations import deepspeed as hf_ds
    switch = _Zero3Switch(ds_config)  # strong reference for the block's lifetime
    hf_ds.set_hf_deepspeed_config(switch)
    try:
        yield
    finally:
        hf_ds.unset_hf_deepspeed_config()
        del switch


def zero3_switch_is_on() -> bool:
    import sys

    hf_ds = sys.modules.get("transformers.integrations.deepspeed")
    return bool(hf_ds is not None and hf_ds.is_deepspeed_zero3_enabled())


def resolve_attn(impl: str, device: torch.device) -> str:
    if impl != "auto":
        if impl == "flash_attention_2" and device.type != "cuda":
            raise ValueError("attn_implementation='flash_attention_2' needs CUDA; use 'auto' or 'sdpa'")
        return impl
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_logit_path(config, key: str) -> None:
    """Refuse a model whose logit transform the engine does not implement (families.logit_transform raises)."""
    from .families import logit_transform

    logit_transform(config, key)


def load_model(path: Optional[str], init: Optional[dict], *, key: str, dtype: torch.dtype, attn: str,
               init_seed: int = 0) -> nn.Module:
    """A causal LM from ``path`` (local, offline), or built from the ``init`` config dict with ``init_seed``
    (``model_type`` picks the config class, default "llama"; see families.init_config)."""
    from .families import init_config, model_from_config, supported_attn

    if init is not None:
        cfg = init_config(init, key)
        cfg._attn_implementation = supported_attn(cfg, attn)
        state = torch.random.get_rng_state()
        torch.manual_seed(init_seed)
        try:
            if zero3_switch_is_on():
                import deepspeed
                from transformers.integrations import deepspeed_config

                cfg.dtype = dtype
                with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
                    model = model_from_config(cfg)
            else:
                model = model_from_config(cfg).to(dtype)
        finally:
            torch.random.set_rng_state(state)
    else:
        cfg = load_config(path, key=f"{key}.path")
        check_logit_path(cfg, f"{key}.path")
        model = load_causal_lm(path, key=f"{key}.path", dtype=dtype, attn_implementation=supported_attn(cfg, attn))
    check_logit_path(model.config, key)
    return model


def _checkpoint_tensor(path: str, name: str) -> Optional[torch.Tensor]:
    from safetensors import safe_open

    files = []
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            wm = json.load(f).get("weight_map", {})
        if name in wm:
            files.append(os.path.join(path, wm[name]))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files.append(os.path.join(path, "model.safetensors"))
    for fp in files:
        with safe_open(fp, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return None


def verify_weights(model: nn.Module, path: Optional[str], *, key: str) -> None:
    """Compare the loaded input embedding with the checkpoint on disk (gathered when ZeRO-3 partitioned).

    Catches a teacher left at its initial values or loaded as empty partitions. Only safetensors
    checkpoints are checked (reading a .bin needs unpickling the whole file)."""
    if path is None:
        return
    emb = model.get_input_embeddings().weight
    pname = next((n for n, p in model.named_parameters() if p is emb), None)
    if pname is None:
        return
    ref = _checkpoint_tensor(path, pname)
    if ref is None:
        return
    ctx = contextlib.nullcontext()
    if hasattr(emb, "ds_id"):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([emb], modifier_rank=None)
    with ctx:
        got = emb.detach().float().cpu()
        if got.shape != ref.shape or not torch.allclose(got, ref.float(), rtol=1e-2, atol=1e-3):
            raise ValueError(
                f"{key}: the loaded weights differ from the checkpoint at {path!r} (tensor {pname}: shape "
                f"{tuple(got.shape)} vs {tuple(ref.shape)}): the model was not loaded correctly — e.g. "
                f"transformers' process-wide ZeRO-3 switch left it partitioned or at its initial values")
