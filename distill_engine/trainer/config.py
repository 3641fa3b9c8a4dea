"""The run configuration: typed dataclasses, loaded from one YAML file plus ``--set key=value`` overrides.

Every key is checked: an unknown key, a value of the wrong type or outside its allowed set raises
``ValueError`` naming the dotted key (``train.lr``) and what it accepts. The schema, with defaults:

.. code-block:: yaml

    run:
      output_dir: runs/distill      # checkpoints/, final/ (the student), metrics.jsonl, tensorboard/
      seed: 1234
      resume: false                 # true: continue from output_dir/checkpoints/latest; auto: when one exists
      stop_at_step: null            # end this invocation after this optimizer step (saving a checkpoint)
      verify_checkpoint: full       # resume check of the checkpoint manifests: full (sha256) | size | none
      allow_config_change: false    # resume although seq_len / micro-batch / seed / loss settings changed
      progress: auto                # tqdm bar on rank 0: auto (when stderr is a terminal) | true | false
      tensorboard: true
    student:
      path: null                    # local Hugging Face model directory ...
      init: null                    # ... or a config dict (model_type: default llama): a fresh model
      init_seed: 0
      attn_implementation: auto     # auto: flash_attention_2 when installed and on CUDA, else sdpa
      gradient_checkpointing: false
      zero_init: true               # under ZeRO-3, load the student partitioned (deepspeed.zero.Init)
    teacher:
      source: colocated             # colocated | cache | stream | none  (`teacher: none` is a shorthand)
      path: null                    # local HF model (colocated, stream, cache-teacher)
      init: null                    # or a config dict with model_type (tiny demo runs)
      init_seed: 1
      dtype: auto                   # auto: bfloat16 on CUDA, float32 on CPU | float32 | bfloat16
      attn_implementation: auto
      zero3: false                  # partition the teacher with ZeRO-3 inference (too big for one device)
      k: 64
      method: topk                  # topk | sample
      cache_dir: null               # cache source: directory written by `distill-engine cache-teacher`
      cache_verify: lazy            # lazy (each shard's sha256 on first use) | full (all at start) | none
      cache_shard_samples: 1024
      logprob_dtype: float16        # packed targets in caches and streams: float16 | bfloat16 | uint8 | float32
                                    # (float32: lossless, bit-identical targets through the cache and the stream)
      bitpack_ids: false            # ids in ceil(log2(V+1)) bits instead of int32 (17 at V = 128k)
      prefetch: 4                   # micro-batches buffered ahead (cache reader, stream receiver/sender)
      ranks: 0                      # stream: the last R processes host the teacher (CLI --teacher-ranks)
      stream_backend: auto          # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
      verify_weights: true          # compare a teacher tensor with the checkpoint file after loading
      batch_size: null              # cache-teacher: samples per teacher forward (default micro_batch_size)
      backend: auto                 # backend of de.teacher_targets (auto | triton | cpu | torch)
    loss:
      divergence: forward_kl        # forward_kl | reverse_kl | jsd
      beta: 0.5
      temperature: 1.0              # also the temperature of the teacher targets
      ce_weight: 0.0                # (1-c)·T²·D + c·CE(labels); forced to 1 with teacher none
      tail: bucket                  # bucket | renormalize
      backend: auto
      validate: first               # first (check the first micro-batches) | always | never
      features: null                # feature distillation, e.g. {layer_map: uniform, kind: mse, weight: 1.0}
      relation: null                # relation distillation, e.g. {kind: similarity, pooling: mean, weight: 1.0}
      on_policy: null               # on-policy distillation (GKD), e.g.:
        # fraction: 0.5               # λ: share of micro-batches the student generates (0 off-policy, 1 fully)
        # prompt_tokens: 16           # the student continues the first prompt_tokens tokens of each sample, or
        #                             # its data.prompt_field text, left-truncated to its last prompt_tokens tokens
        # max_new_tokens: 32
        # temperature: 1.0            # sampling temperature (> 0)
        # top_p: 1.0                  # nucleus sampling, in (0, 1]
        # objective: divergence       # divergence (loss.divergence on the generated tokens) | sampled_reverse_kl
        # gather_for_generation: true # ZeRO-3: generate with one full copy of the student (memory: its params)
    data:
      train_files: []               # .jsonl / .json / .txt / .parquet
      format: auto                  # auto | json | text | parquet
      text_field: text
      prompt_field: prompt          # on-policy: when the .jsonl/.json/.parquet data has this column, rollouts
                                    # continue its text (packed samples: the prompt of the document a sample
                                    # starts in); an empty prompt is an error; off-policy steps use the text
      text_sample_by: document      # text files: document | paragraph | line
      tokenizer: null               # tokenizer dir or "byte"; default: the student's directory
      seq_len: 256
      packing: true
      add_eos: true
      max_samples: null
      shuffle: true
      cache_dir: null               # datasets' cache
    train:
      zero_stage: 2                 # 0 | 1 | 2 | 3
      precision: fp32               # fp32 | bf16
      micro_batch_size: 4
      grad_accum: 1
      max_steps: 100                # optimizer steps
      lr: 3.0e-4
      min_lr_ratio: 0.1             # cosine decay to lr·min_lr_ratio
      warmup_steps: 10
      weight_decay: 0.0
      betas: [0.9, 0.95]
      eps: 1.0e-8
      grad_clip: 1.0                # 0 = off
      log_every: 1
      save_every: 0                 # optimizer steps between checkpoints (0: only at the end / stop)
      save_final: true              # save_pretrained the student (+ tokenizer) to output_dir/final
      engine: auto                  # deepspeed | torch (single process, no ZeRO) | auto
      device: auto                  # auto | cpu | cuda
      dist_timeout_s: 600
      heartbeat_timeout_s: 60
      deepspeed: {}                 # merged into the generated DeepSpeed config (e.g. offload, buckets)
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

import yaml


@dataclass
class RunConfig:
    output_dir: str = "runs/distill"
    seed: int = 1234
    resume: Union[bool, Literal["auto"]] = False
    stop_at_step: Optional[int] = None
    verify_checkpoint: Literal["full", "size", "none"] = "full"
    allow_config_change: bool = False
    progress: Literal["auto", "true", "false"] = "auto"
    tensorboard: bool = True


@dataclass
class ModelConfig:
    path: Optional[str] = None
    init: Optional[Dict[str, Any]] = None
    init_seed: int = 0
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


@dataclass
class StudentConfig(ModelConfig):
    gradient_checkpointing: bool = False
    zero_init: bool = True


@dataclass
class TeacherConfig(ModelConfig):
    source: Literal["colocated", "cache", "stream", "none"] = "colocated"
    init_seed: int = 1
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    zero3: bool = False
    k: int = 64
    method: Literal["topk", "sample"] = "topk"
    cache_dir: Optional[str] = None
    cache_verify: Literal["lazy", "full", "none"] = "lazy"
    cache_shard_samples: int = 1024
    logprob_dtype: Literal["float16", "bfloat16", "uint8", "float32"] = "float16"
    bitpack_ids: bool = False
    prefetch: int = 4
    ranks: int = 0
    stream_backend: Literal["auto", "gloo", "nccl"] = "auto"
    verify_weights: bool = True
    batch_size: Optional[int] = None
    backend: Literal["auto", "triton", "cpu", "torch"] = "auto"


@dataclass
class FeatureConfig:
    layer_map: Union[str, List[List[int]]] = "uniform"
    kind: Literal["mse", "cosine"] = "mse"
    weight: float = 1.0
    layer_weights: Optional[List[float]] = None


@dataclass
class RelationConfig:
    """loss.relation (issue 16): example-level relations of pooled final states, or MiniLM-v2 token relations
    of the Q/K/V projections of mapped layers (kind: token). See distill_engine/trainer/relation.py."""
    kind: Literal["similarity", "similarity_mse", "distance", "angle", "token"] = "similarity"
    pooling: Literal["mean", "last", "cls"] = "mean"
    layer_map: Union[str, List[List[int]]] = "last"  # token: "last" or [[student_layer, teacher_layer], ...]
    relation_heads: int = 1
    weight: float = 1.0
    temperature: float = 1.0
    gather_across_ranks: bool = False


@dataclass
class OnPolicyConfig:
    fraction: float = 0.5
    prompt_tokens: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    objective: Literal["divergence", "sampled_reverse_kl"] = "divergence"
    gather_for_generation: bool = True


@dataclass
class LossConfig:
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    tail: Literal["bucket", "renormalize"] = "bucket"
    backend: Literal["auto", "triton", "cpu", "torch"] = "auto"
    validate: Literal["first", "always", "never"] = "first"
    features: Optional[FeatureConfig] = None
    relation: Optional[RelationConfig] = None
    on_policy: Optional[OnPolicyConfig] = None


@dataclass
class DataConfig:
    train_files: List[str] = field(default_factory=list)
    format: Literal["auto", "json", "text", "parquet"] = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    text_sample_by: Literal["document", "paragraph", "line"] = "document"
    tokenizer: Optional[str] = None
    seq_len: int = 256
    packing: bool = True
    add_eos: bool = True
    max_samples: Optional[int] = None
    shuffle: bool = True
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 1
    save_every: int = 0
    save_final: bool = True
    engine: Literal["auto", "deepspeed", "torch"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 60.0
    deepspeed: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


# plain value types: (accepts(value), what the error says is expected); bool is no int here (YAML `true` ≠ 1)
_PLAIN = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _convert(key: str, tp, value):
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if dataclasses.is_dataclass(args[0]) and len(args) == 2 and args[1] is type(None):
            return _convert(key, args[0], value)  # Optional[section]: report the inner key's own error
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(key, a, value)
            except ValueError as e:
                errors.append(e)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) and isinstance(value, dict):
            raise errors[0]  # an optional section: name the bad key inside it, not the whole section
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices) and "true" in choices:
            value = "true" if value else "false"
        if value not in choices or (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            raise ValueError(f"{key}: must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _PLAIN:
        accepts, what = _PLAIN[tp]
        if not accepts(value):
            raise ValueError(f"{key}: expected {what}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else \
                f" (allowed: {', '.join(names)})"
            raise ValueError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _convert(key, hints[k], v)
    return cls(**kwargs)


def _normalize(raw: Dict[str, Any]) -> Dict[str, Any]:
    raw = dict(raw)
    if raw.get("teacher") in ("none", None) and "teacher" in raw:
        raw["teacher"] = {"source": "none"}
    return raw


def _positive(key: str, v, allow_zero: bool = False) -> None:
    if v is None:
        return
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def validate(cfg: Config) -> Config:
    """Cross-field checks; raises ValueError naming the key."""
    t, s, lo, d, tr = cfg.teacher, cfg.student, cfg.loss, cfg.data, cfg.train
    if s.path is None and s.init is None:
        raise ValueError("student.path is not set: point it at a Hugging Face model directory (or give student.init)")
    if s.path is not None and s.init is not None:
        raise ValueError("student.path and student.init are both set; keep one")
    if t.source in ("colocated", "stream") and t.path is None and t.init is None:
        raise ValueError(f"teacher.path is not set but teacher.source={t.source!r} runs the teacher; set teacher.path "
                         f"(or teacher.source: cache with teacher.cache_dir, or teacher: none)")
    if t.path is not None and t.init is not None:
        raise ValueError("teacher.path and teacher.init are both set; keep one")
    if t.source == "cache" and not t.cache_dir:
        raise ValueError("teacher.source is 'cache' but teacher.cache_dir is not set; build a cache with "
                         "`distill-engine cache-teacher --config ...` and set teacher.cache_dir to it")
    if t.source == "stream" and t.ranks < 1:
        raise ValueError("teacher.source is 'stream' but teacher.ranks is 0; pass --teacher-ranks R (R >= 1)")
    if t.source != "stream" and t.ranks:
        raise ValueError(f"teacher.ranks={t.ranks} is only used with teacher.source: stream (got {t.source!r})")
    for key, v in (("teacher.k", t.k), ("teacher.prefetch", t.prefetch), ("teacher.cache_shard_samples", t.cache_shard_samples),
                   ("data.seq_len", d.seq_len), ("train.micro_batch_size", tr.micro_batch_size),
                   ("train.grad_accum", tr.grad_accum), ("train.max_steps", tr.max_steps), ("train.lr", tr.lr),
                   ("loss.temperature", lo.temperature), ("train.log_every", tr.log_every),
                   ("train.dist_timeout_s", tr.dist_timeout_s), ("train.heartbeat_timeout_s", tr.heartbeat_timeout_s),
                   ("teacher.batch_size", t.batch_size), ("data.max_samples", d.max_samples),
                   ("run.stop_at_step", cfg.run.stop_at_step)):
        _positive(key, v)
    for key, v in (("train.warmup_steps", tr.warmup_steps), ("train.weight_decay", tr.weight_decay),
                   ("train.grad_clip", tr.grad_clip), ("train.save_every", tr.save_every),
                   ("train.min_lr_ratio", tr.min_lr_ratio)):
        _positive(key, v, allow_zero=True)
    if d.seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2, got {d.seq_len}")
    if not 0.0 <= lo.ce_weight <= 1.0:
        raise ValueError(f"loss.ce_weight must be in [0, 1], got {lo.ce_weight}")
    if not 0.0 < lo.beta < 1.0 and lo.divergence == "jsd":
        raise ValueError(f"loss.beta must be in (0, 1) for jsd, got {lo.beta}")
    if lo.divergence == "reverse_kl" and lo.tail == "renormalize":
        raise ValueError("loss.divergence: reverse_kl is undefined with loss.tail: renormalize; use tail: bucket")
    if len(tr.betas) != 2 or not all(0.0 <= b < 1.0 for b in tr.betas):
        raise ValueError(f"train.betas must be two numbers in [0, 1), got {tr.betas}")
    if tr.min_lr_ratio > 1:
        raise ValueError(f"train.min_lr_ratio must be <= 1, got {tr.min_lr_ratio}")
    if lo.features is not None and t.source in ("cache", "none"):
        raise ValueError(f"loss.features needs the teacher's hidden states, which teacher.source={t.source!r} does "
                         f"not provide; use colocated or stream, or remove loss.features")
    if lo.relation is not None:
        _validate_relation(lo.relation, t.source)
    if not d.train_files:
        raise ValueError("data.train_files is empty; list .jsonl / .txt / .parquet files")
    if lo.on_policy is not None:
        _validate_on_policy(cfg)
    if tr.precision == "bf16" and tr.engine == "torch":
        pass  # the torch engine trains in autocast-free bf16 params; allowed
    return cfg


def _validate_relation(r: RelationConfig, source: str) -> None:
    if source in ("cache", "none"):
        raise ValueError(f"loss.relation needs the teacher's states, which teacher.source={source!r} does not "
                         f"provide; use colocated or stream, or remove loss.relation")
    _positive("loss.relation.temperature", r.temperature)
    _positive("loss.relation.relation_heads", r.relation_heads)
    _positive("loss.relation.weight", r.weight, allow_zero=True)
    if isinstance(r.layer_map, str) and r.layer_map != "last":
        raise ValueError(f"loss.relation.layer_map must be 'last' or a list of [student_layer, teacher_layer] "
                         f"pairs, got {r.layer_map!r}")
    if not isinstance(r.layer_map, str) and (not r.layer_map or any(len(p) != 2 for p in r.layer_map)):
        raise ValueError(f"loss.relation.layer_map must be a non-empty list of [student_layer, teacher_layer] "
                         f"pairs, got {r.layer_map!r}")


def _validate_on_policy(cfg: Config) -> None:
    op, t = cfg.loss.on_policy, cfg.teacher
    if not 0.0 <= op.fraction <= 1.0:
        raise ValueError(f"loss.on_policy.fraction must be in [0, 1] (the share of generated micro-batches), "
                         f"got {op.fraction}")
    for key, v in (("prompt_tokens", op.prompt_tokens), ("max_new_tokens", op.max_new_tokens),
                   ("temperature", op.temperature)):
        _positive(f"loss.on_policy.{key}", v)
    if not 0.0 < op.top_p <= 1.0:
        raise ValueError(f"loss.on_policy.top_p must be in (0, 1], got {op.top_p}")
    if op.fraction == 0.0:
        return
    if t.source == "cache":
        raise ValueError("loss.on_policy needs the teacher to score the student's own samples, but "
                         "teacher.source: cache holds targets for fixed text; use teacher.source: colocated")
    if t.source == "none":
        raise ValueError("loss.on_policy needs a teacher to score the student's samples; teacher.source is none")
    if cfg.loss.features is not None and op.objective == "sampled_reverse_kl":
        raise ValueError("loss.on_policy.objective: sampled_reverse_kl does not combine with loss.features; use "
                         "objective: divergence or remove loss.features")


def parse_override(text: str):
    if "=" not in text:
        raise ValueError(f"--set expects key=value (e.g. train.lr=1e-4), got {text!r}")
    key, val = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set {text!r}: empty key")
    if val.strip() == "":
        return key, None
    try:
        return key, yaml.safe_load(val)
    except yaml.YAMLError as e:
        first = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"--set {key}: the value {val!r} is not valid YAML ({first}); quote strings, e.g. "
                         f"--set '{key}=\"...\"'") from None


def apply_overrides(raw: Dict[str, Any], overrides) -> Dict[str, Any]:
    """``overrides``: iterable of "a.b=value" strings or (key, value) pairs; values are parsed as YAML."""
    raw = _normalize(raw)
    for item in overrides or ():
        key, val = parse_override(item) if isinstance(item, str) else item
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None or nxt == "none":
                nxt = {}
                if p == "teacher" and node.get(p) == "none":
                    nxt = {"source": "none"}
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {key}: '{p}' is not a section")
            node[p] = nxt = dict(nxt)
            node = nxt
        node[parts[-1]] = val
    return raw


def from_dict(raw: Dict[str, Any], overrides=None, *, check: bool = True) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"the config must be a mapping of sections (run, student, teacher, loss, data, train), "
                         f"got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    cfg = _build(Config, raw)
    return validate(cfg) if check else cfg


def load_config(source: Union[str, os.PathLike, Dict[str, Any], Config, None], overrides=None, *,
                check: bool = True) -> Config:
    """A :class:`Config` from a YAML path, a dict or a Config, with overrides applied and validated.

    Relative paths in a YAML file's ``*.path``, ``*_dir`` and ``data.train_files`` are resolved against the
    file's directory, so an example config runs from any working directory."""
    if isinstance(source, Config):
        raw = dataclasses.asdict(source)
        if source.teacher.source == "none":
            raw["teacher"] = {"source": "none"}
        return from_dict(raw, overrides, check=check)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path!r} is not valid YAML: {e}") from None
        raw = _resolve_paths(raw or {}, os.path.dirname(os.path.abspath(path)))
        return from_dict(raw, overrides, check=check)
    return from_dict(dict(source or {}), overrides, check=check)


_PATH_KEYS = {("student", "path"), ("teacher", "path"), ("teacher", "cache_dir"), ("data", "tokenizer"),
              ("data", "cache_dir")}


def _resolve_paths(raw: Dict[str, Any], base: str) -> Dict[str, Any]:
    def fix(p):
        if not isinstance(p, str) or p == "byte" or os.path.isabs(p) or p.startswith("~"):
            return os.path.expanduser(p) if isinstance(p, str) else p
        cand = os.path.join(base, p)
        # Keep the path relative to the working directory when it exists there and not beside the file.
        return p if os.path.exists(p) and not os.path.exists(cand) else cand
    raw = dict(raw)
    for sec, key in _PATH_KEYS:
        if isinstance(raw.get(sec), dict) and key in raw[sec]:
            raw[sec] = dict(raw[sec])
            raw[sec][key] = fix(raw[sec][key])
    if isinstance(raw.get("data"), dict) and isinstance(raw["data"].get("train_files"), list):
        raw["data"]["train_files"] = [fix(p) for p in raw["data"]["train_files"]]
    return raw
