"""``train(config)``: the distillation run.

One optimizer step = ``grad_accum`` micro-batches per student rank. For each micro-batch the teacher source
provides sparse targets for its loss rows, the student runs to its final hidden states, and the fused loss
(plus feature losses) is backpropagated through the engine.

Normalization. Every valid token of an optimizer step weighs the same, whichever micro-batch or rank it is
in: before the step's first backward, the step's valid-token count is summed over micro-batches and ranks
(one all-reduce of a scalar), and each micro-batch backpropagates ``loss_sum · dp_size / tokens``. The data
parallel gradient average (÷ dp_size) then leaves Σ_tokens loss / tokens — not the mean of per-micro-batch
means, which would over-weight short micro-batches.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data import MicroBatchPlan, MicroBatchStream, check_shared_vocab, load_texts, load_tokenizer, tokenize
from ..data.tokenizer import tokenizer_for_model
from ..loading import load_config as load_model_config
from ..teacher import topology
from ..teacher.base import NoTeacher, check_alignment
from ..teacher.colocated import ColocatedTeacher, TeacherHead
from . import checkpoint as ckpt
from . import guards, storage
from .config import Config, load_config
from .engine import DeepSpeedEngine, TorchEngine, deepspeed_config, init_deepspeed_comm, quiet_deepspeed
from .metrics import MetricsLogger, format_summary
from .models import load_model, resolve_attn, verify_weights, zero3_loading
from .relation import RelationTerm, relation_spec
from .student import DistillStudent, FusedHeadLoss


# ---------------------------------------------------------------------------------------------- set-up helpers
def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(cfg: Config, world: int) -> str:
    e = cfg.train.engine
    if e == "auto":
        e = "deepspeed" if _deepspeed_available() else "torch"
    if e == "torch":
        if world > 1:
            raise ValueError("train.engine='torch' runs a single process; multi-process training needs DeepSpeed "
                             "(pip install deepspeed)")
        if cfg.train.zero_stage != 0:
            cfg.train.zero_stage = 0  # the torch engine is the ZeRO-0 equivalent
    elif not _deepspeed_available():
        raise ValueError("train.engine='deepspeed' but DeepSpeed is not installed; pip install deepspeed or set "
                         "train.engine: torch (single process)")
    return e


def resolve_device(cfg: Config, topo) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device='cuda' but CUDA is not available; use train.device: cpu")
        return torch.device("cuda", topo.local_rank)
    return torch.device("cpu")


def teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    d = cfg.teacher.dtype
    if d == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_data(cfg: Config, tokenizer):
    d = cfg.data
    texts = load_texts(d.train_files, fmt=d.format, text_field=d.text_field, sample_by=d.text_sample_by,
                       cache_dir=d.cache_dir)
    return tokenize(texts, tokenizer, seq_len=d.seq_len, packing=d.packing, add_eos=d.add_eos,
                    max_samples=d.max_samples)


def resolve_tokenizer(cfg: Config):
    spec = cfg.data.tokenizer or cfg.student.path
    if spec is None:
        raise ValueError("data.tokenizer is not set and the student is built from student.init; set data.tokenizer "
                         "(a tokenizer directory, or 'byte')")
    return load_tokenizer(spec, key="data.tokenizer" if cfg.data.tokenizer else "student.path")


def teacher_feature_layers(cfg: Config, student_cfg, teacher_cfg):
    """Sorted teacher layers the feature map uses (indices into hidden_states: layer + 1)."""
    if cfg.loss.features is None:
        return None
    from ..distiller import HiddenStateDistiller

    f = cfg.loss.features
    probe = HiddenStateDistiller(1, 1, student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers,
                                 layer_map=f.layer_map if isinstance(f.layer_map, str) else [tuple(p) for p in f.layer_map],
                                 weights=f.layer_weights, kind=f.kind)
    return sorted({t + 1 for _, t in probe.layer_pairs})


def load_teacher_runner(cfg: Config, device: torch.device, *, student_config=None):
    """The frozen teacher as a :class:`TeacherHead`, or the ZeRO-3 inference engine that wraps one."""
    t = cfg.teacher
    dtype = teacher_dtype(cfg, device)
    attn = resolve_attn(t.attn_implementation, device)
    ds_cfg = None
    if t.zero3:
        ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 1 << 30}
        ds_cfg["zero_optimization"].update(cfg.train.deepspeed.get("zero_optimization", {}))
        ds_cfg["zero_optimization"]["stage"] = 3
        quiet_deepspeed()
        init_deepspeed_comm(dist.get_backend())
    # Loaded plainly unless the teacher itself is ZeRO-3 partitioned: never under the student's switch.
    with zero3_loading(ds_cfg):
        model = load_model(t.path, t.init, key="teacher", dtype=dtype, attn=attn, init_seed=t.init_seed)
    if ds_cfg is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    layers = teacher_feature_layers(cfg, student_config, model.config) if student_config is not None else None
    rel = relation_spec(cfg, student_config, model.config) if student_config is not None else None
    head = TeacherHead(model, k=t.k, temperature=cfg.loss.temperature, method=t.method, backend=t.backend,
                       feature_layers=layers, relation=rel)
    if ds_cfg is not None:
        import deepspeed

        deepspeed.zero.register_external_parameter(head, model.get_output_embeddings().weight)
        engine, _, _, _ = deepspeed.initialize(model=head, config=ds_cfg)  # no optimizer: inference only
        engine.eval()
        if t.verify_weights:
            verify_weights(model, t.path, key="teacher.path")
        return engine, model
    if t.verify_weights:
        verify_weights(model, t.path, key="teacher.path")
    return head, model


def _dp_sum(values, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64, device=device)  # exact token counts at any scale
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------- the run
def train(config: Any, overrides=None) -> Dict[str, Any]:
    """Run a distillation job; returns a summary dict (see README). ``config`` is a YAML path, a dict or a
    :class:`Config`; ``overrides`` are ``"key=value"`` strings (as ``--set``)."""
    cfg = load_config(config, overrides)
    guards.preflight(cfg)  # output dir, model files, init dicts: before any process group or model
    topo = topology.setup(teacher_ranks=cfg.teacher.ranks if cfg.teacher.source == "stream" else 0,
                          timeout_s=cfg.train.dist_timeout_s, heartbeat_timeout_s=cfg.train.heartbeat_timeout_s,
                          bridge_backend=cfg.teacher.stream_backend)
    try:
        trainer = Trainer(cfg, topo)
        if topo.role == "teacher":
            return trainer.serve_teacher()
        trainer.setup()
        return trainer.run()
    except (guards.Preempted, guards.NonFiniteError):
        raise  # every student rank raises it at the same step: nothing to tell the peers
    except BaseException as exc:
        topology.report_failure(exc)
        raise


class Trainer:
    """The pieces of a run, built by :meth:`setup` and driven by :meth:`run` (tests drive single steps)."""

    def __init__(self, cfg: Config, topo):
        self.t0 = time.time()
        self.cfg, self.topo = cfg, topo
        seed_everything(cfg.run.seed)
        self.device = resolve_device(cfg, topo)
        self.rank, self.world = topo.rank, topo.role_world_size
        tr = cfg.train
        self.tokenizer = resolve_tokenizer(cfg)
        self.samples = build_data(cfg, self.tokenizer)
        self.plan = MicroBatchPlan(len(self.samples), micro_batch_size=tr.micro_batch_size,
                                   dp_size=topo.student_ranks, dp_rank=self.rank if topo.role == "student" else 0,
                                   seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        self.stream = MicroBatchStream(self.samples, self.plan, self.tokenizer.pad_token_id)
        self.start_step, self.resume_tag = 0, None
        self.storage = None
        if topo.role == "student":
            # Which ranks share output_dir's file system (multi-node jobs may write to node-local disks).
            os.makedirs(cfg.run.output_dir, exist_ok=True)
            self.storage = storage.probe(cfg.run.output_dir)
        if cfg.run.resume:
            self.start_step, self.resume_tag = guards.resume_point(cfg, topo, self.rank, self.world, self.device,
                                                                   self.storage)
        self.end_step = min(tr.max_steps, cfg.run.stop_at_step or tr.max_steps)

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self) -> "Trainer":
        cfg, tr, device = self.cfg, self.cfg.train, self.device
        ds_cfg = self._engine_config()
        s_dtype = torch.bfloat16 if tr.precision == "bf16" and self.engine_kind == "deepspeed" else torch.float32
        self.student = student = self._load_student(ds_cfg, s_dtype)
        teacher_model_cfg = self._build_source(student)
        tok = self.tokenizer
        self.ce_weight = 1.0 if cfg.teacher.source == "none" else cfg.loss.ce_weight

        # The trained module and its engine.
        self.features = None
        if cfg.loss.features is not None:
            from ..distiller import HiddenStateDistiller

            f = cfg.loss.features
            self.features = HiddenStateDistiller.from_configs(
                student.config, teacher_model_cfg, kind=f.kind, backend=cfg.loss.backend, weights=f.layer_weights,
                layer_map=f.layer_map if isinstance(f.layer_map, str) else [tuple(p) for p in f.layer_map])
            self.features.to(s_dtype)
        lo = cfg.loss
        self.on_policy = None
        head_cls = FusedHeadLoss
        if lo.on_policy is not None and lo.on_policy.fraction > 0:
            from .onpolicy import OnPolicy, OnPolicyHeadLoss, prompt_table

            head_cls = OnPolicyHeadLoss
            self.on_policy = OnPolicy(cfg, student, rank=self.rank, device=device, zero3=self.zero3,
                                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                      prompts=prompt_table(cfg, tok, self.samples))
        transform = _transform_kwargs(student.config)  # sampled_reverse_kl's logprobs_at applies it too
        head = head_cls(student.get_output_embeddings(), divergence=lo.divergence, beta=lo.beta,
                        temperature=lo.temperature, ce_weight=self.ce_weight, tail=lo.tail, backend=lo.backend,
                        zero3=self.zero3, **transform)
        self.relation = None
        if lo.relation is not None:  # issue 16
            if teacher_model_cfg is None:
                raise ValueError("loss.relation needs the teacher model's config; use teacher.source colocated or stream")
            self.relation = RelationTerm(lo.relation, relation_spec(cfg, student.config, teacher_model_cfg),
                                         backend=lo.backend)
        module = DistillStudent(student, head, self.features,
                                cfg.loss.features.weight if self.features is not None else 1.0, relation=self.relation)
        if self.engine_kind == "deepspeed":
            self.engine = DeepSpeedEngine(module, cfg, ds_cfg, device)
        else:
            self.engine = TorchEngine(module, cfg, device)
        self.engine.train()
        if self.resume_tag is not None:
            state = ckpt.load(self.engine, cfg.run.output_dir, rank=self.rank, world=self.world, tag=self.resume_tag)
            self.start_step = int(state["step"])
        self.source.start(self.start_step * tr.grad_accum, self.end_step * tr.grad_accum)
        self.bad_targets = False
        self.acc = torch.zeros(4, dtype=torch.float64)  # loss, divergence, feature sums and tokens since last log
        self.rel_acc = torch.zeros(2, dtype=torch.float64)  # relation loss sum and micro-batch count (issue 16)
        self.acc_aux = 0.0  # MoE router aux loss × rows since last log
        self.wait_s = 0.0
        return self

    def _engine_config(self) -> Optional[dict]:
        """The engine kind (``self.engine_kind``, ``self.zero3``) and its DeepSpeed config (None: plain torch)."""
        cfg, tr = self.cfg, self.cfg.train
        self.engine_kind = resolve_engine(cfg, self.world)
        if self.engine_kind == "deepspeed":
            quiet_deepspeed()
            init_deepspeed_comm(self.topo.backend)  # before zero.Init asks deepspeed.comm for the world size
        self.zero3 = self.engine_kind == "deepspeed" and tr.zero_stage == 3
        ds_cfg = None
        if self.engine_kind == "deepspeed":
            try:  # bucket sizes follow the student's width; a bad path is reported by the model loader below
                width = getattr(_student_config(cfg), "hidden_size", None)
            except Exception:
                width = None
            ds_cfg = deepspeed_config(cfg, self.world, width)
        if ds_cfg is not None and not self.storage.shared:
            # local rank 0 of every node writes the module states a ZeRO-0/1/2 resume reads on every rank
            ds_cfg.setdefault("checkpoint", {}).setdefault("use_node_local_storage", True)
        return ds_cfg

    def _load_student(self, ds_cfg: Optional[dict], s_dtype: torch.dtype):
        """The student: partitioned at load under ZeRO-3 — the only place transformers' switch is on."""
        cfg, device = self.cfg, self.device
        attn = resolve_attn(cfg.student.attn_implementation, device)
        with zero3_loading(ds_cfg if self.zero3 and cfg.student.zero_init else None):
            student = load_model(cfg.student.path, cfg.student.init, key="student", dtype=s_dtype, attn=attn,
                                 init_seed=cfg.student.init_seed)
        if cfg.student.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
        return student

    def _build_source(self, student):
        """The teacher source (``self.source``) for the configured ``teacher.source``, with the vocabulary checks;
        returns the teacher's model config (None for cache and none)."""
        cfg, tr, device = self.cfg, self.cfg.train, self.device
        teacher_model_cfg = None
        tok = self.tokenizer
        if cfg.teacher.source == "colocated":
            runner, tmodel = load_teacher_runner(cfg, device, student_config=student.config)
            teacher_model_cfg = tmodel.config
            self.teacher_model = tmodel
            check_shared_vocab(tok, student.config, tmodel.config, tokenizer_for_model(cfg.teacher.path),
                               allow_padded=True)
            if int(tmodel.config.vocab_size) != int(student.config.vocab_size):  # padded vocabularies (issue 12)
                (runner.module if hasattr(runner, "module") else runner).vocab_limit = len(tok)
            self.source = ColocatedTeacher(runner, device=device, seed=cfg.run.seed, dp_rank=self.rank,
                                           method=cfg.teacher.method)
        elif cfg.teacher.source == "cache":
            from ..teacher.cache import CacheTeacher, expected_manifest

            check_shared_vocab(tok, student.config)
            self.source = CacheTeacher(cfg.teacher.cache_dir, expect=expected_manifest(cfg, tok, self.samples),
                                       samples=self.samples, plan=self.plan, prefetch=cfg.teacher.prefetch,
                                       verify=cfg.teacher.cache_verify)
        elif cfg.teacher.source == "stream":
            from ..teacher.stream import StreamTeacher

            check_shared_vocab(tok, student.config)
            teacher_model_cfg = _teacher_config(cfg)
            self.source = StreamTeacher(self.topo, prefetch=cfg.teacher.prefetch, timeout_s=tr.dist_timeout_s)
        else:
            check_shared_vocab(tok, student.config)
            self.source = NoTeacher()
        return teacher_model_cfg

    # ------------------------------------------------------------------------------------------ one step
    def step(self, step: int, *, measure: bool = False, on_boundary=None) -> float:
        """Forward/backward of the ``grad_accum`` micro-batches of optimizer step ``step``, then the optimizer
        step. ``on_boundary(engine)`` runs after the last backward, before the optimizer (tests read the
        reduced gradients there). Returns the step's global valid-token count."""
        cfg, GA = self.cfg, self.cfg.train.grad_accum
        lo = cfg.loss
        batches = [self.stream.batch(step * GA + a) for a in range(GA)]
        if self.on_policy is not None:  # λ of the micro-steps: the student's own continuations instead
            batches = [self.on_policy.rollout(b) for b in batches]
            if hasattr(self.source, "submit"):  # stream teacher: the teacher ranks score the generated batches
                for b in batches:
                    if self.on_policy.is_on(b.micro_step):
                        self.source.submit(b)
        total_tokens = float(_dp_sum([sum(b.n_valid for b in batches)], self.device)[0])
        scale = self.world / max(total_tokens, 1.0)
        validate = lo.validate == "always" or (lo.validate == "first" and step == self.start_step)
        engine = self.engine
        for a, b in enumerate(batches):
            tw = time.time()
            sampled = self.on_policy is not None and self.on_policy.sampled and self.on_policy.is_on(b.micro_step)
            if self.on_policy is not None:
                engine.module.head.sampled = sampled
            tb = self.source.score(b) if sampled else self.source.get(b)  # score: log p_T at the sampled ids
            self.wait_s += time.time() - tw
            check_alignment(tb, b, cfg.teacher.source)
            self.bad_targets = self.bad_targets or guards.targets_bad(tb.logprobs)
            bd, tb = b.to(engine.device), tb.to(engine.device)
            if a == 0 and step == self.start_step:  # issue 12: the engine's logits path must be the model's
                _guard_logits(self, bd)
            vi = bd.valid_index
            labels = bd.labels.reshape(-1).index_select(0, vi)
            extra = {} if self.relation is None else {"teacher_relation": tb.relation, "relation_scale": 1.0 / GA}
            loss, stats = engine(bd.input_ids, bd.attention_mask, vi, labels, tb.ids, tb.logprobs, tb.hidden,
                                 scale=scale, validate=validate, measure_divergence=measure,
                                 teacher_rest_logprob=tb.rest_logprob, **extra)
            engine.backward(loss)
            if a == GA - 1 and on_boundary is not None:
                on_boundary(engine)
            engine.step()
            self.acc[:3] += stats[:3].detach().double().cpu()
            if self.relation is not None:
                self.rel_acc += torch.tensor([float(stats[4]), 1.0], dtype=torch.float64)
            self.acc[3] += b.n_valid
            self.acc_aux += float(stats[3]) if stats.numel() > 3 else 0.0  # MoE router aux loss (issue 12)
        return total_tokens

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> Dict[str, Any]:
        cfg, tr, lo = self.cfg, self.cfg.train, self.cfg.loss
        is_main = self.rank == 0
        logger = MetricsLogger(cfg.run.output_dir, enabled=is_main, total_steps=self.end_step,
                               start_step=self.start_step, progress=cfg.run.progress, tensorboard=cfg.run.tensorboard)
        if is_main:
            os.makedirs(cfg.run.output_dir, exist_ok=True)
            with open(os.path.join(cfg.run.output_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2, default=str)
        first_loss = last_loss = None
        tokens_total = 0.0
        steps_done = 0
        last_ckpt = None
        t_log = t_train = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        preempt = guards.PreemptionHandler()
        try:
            preempt.__enter__()
            for step in range(self.start_step, self.end_step):
                log_now = (step + 1) % tr.log_every == 0 or step + 1 == self.end_step
                lr_now = self.engine.lr()
                loss_before = float(self.acc[0])
                tokens_total += self.step(step, measure=log_now)
                steps_done += 1
                # every rank learns, at the same step, whether the loss went non-finite or a signal came
                loss_sum, stop = guards.agree_step(float(self.acc[0]) - loss_before, preempt.requested is not None,
                                                   self.device)
                gn = self.engine.grad_norm()
                if not math.isfinite(loss_sum) or (gn is not None and not math.isfinite(gn)):
                    raise guards.NonFiniteError(guards.non_finite_message(
                        step + 1, loss_sum, gn, first_step=step == self.start_step, bad_targets=self.bad_targets,
                        last_ckpt=last_ckpt or (self.resume_tag and os.path.join(
                            ckpt.checkpoint_root(cfg.run.output_dir), self.resume_tag))))
                logger.advance()
                if log_now:
                    sums = _dp_sum(self.acc.tolist(), self.device).cpu()
                    n = max(float(sums[3]), 1.0)
                    vals = {"loss": float(sums[0]) / n, "tokens_per_s": float(sums[3]) / max(time.time() - t_log, 1e-9),
                            "lr": lr_now, "teacher_wait_s": self.wait_s}
                    if self.ce_weight < 1.0:
                        vals["kl" if lo.divergence == "forward_kl" else lo.divergence] = float(sums[1]) / n
                    if self.features is not None:
                        vals["feature_loss"] = float(sums[2]) / n
                    if self.relation is not None:  # mean over the micro-batches of every rank since the last log
                        rs = _dp_sum(self.rel_acc.tolist(), self.device).cpu()
                        vals["relation_loss"] = float(rs[0]) / max(float(rs[1]), 1.0)
                        self.rel_acc.zero_()
                    if getattr(self.engine.module, "router", None) is not None:  # same on every rank
                        vals["router_aux_loss"] = float(_dp_sum([self.acc_aux], self.device)[0]) / n
                    self.acc_aux = 0.0
                    gn = self.engine.grad_norm()
                    if gn is not None:
                        vals["grad_norm"] = gn
                    logger.log(step + 1, vals)
                    if first_loss is None:
                        first_loss = vals["loss"]
                    last_loss = vals["loss"]
                    self.acc.zero_()
                    self.wait_s = 0.0
                    t_log = time.time()
                stop_here = (step + 1 == self.end_step and self.end_step < tr.max_steps) or stop
                if (tr.save_every and (step + 1) % tr.save_every == 0) or stop_here:
                    last_ckpt = ckpt.save(self.engine, cfg.run.output_dir, step + 1,
                                          {"max_steps": tr.max_steps, "resume_config": ckpt.resume_config(cfg)},
                                          rank=self.rank, world=self.world, keep=2,
                                          writer=self.storage.is_writer, ranks=self.storage.group)
                if stop and step + 1 < self.end_step:
                    raise guards.Preempted(f"stopped by a signal after optimizer step {step + 1}; checkpoint "
                                           f"{last_ckpt} written — continue with --resume")
        finally:
            preempt.__exit__()
            self.source.close()
            logger.close()
        elapsed = time.time() - t_train
        final_model = None
        if self.end_step == tr.max_steps and tr.save_final:
            final_model = ckpt.save_final_model(self.student, self.tokenizer,
                                                os.path.join(cfg.run.output_dir, "final"), rank=self.rank,
                                                zero3=self.zero3)
        summary = {
            "role": "student", "steps": self.end_step, "steps_this_run": steps_done, "start_step": self.start_step,
            "tokens": tokens_total, "first_loss": first_loss, "final_loss": last_loss,
            "tokens_per_s": tokens_total / elapsed if elapsed > 0 else None, "elapsed_s": time.time() - self.t0,
            "train_s": elapsed, "peak_memory_gb": _peak_memory_gb(self.device), "final_model": final_model,
            "checkpoint": last_ckpt, "output_dir": cfg.run.output_dir, "engine": self.engine_kind,
            "zero_stage": tr.zero_stage, "teacher_source": cfg.teacher.source, "metrics": logger.path,
        }
        if self.on_policy is not None:
            summary["on_policy_micro_batches"] = self.on_policy.rollouts
            summary["on_policy_prompts"] = self.on_policy.prompt_source  # "column" | "first_tokens"
        if is_main and cfg.run.progress != "false":
            sys.stderr.write(format_summary(summary) + "\n")
        return summary

    # ------------------------------------------------------------------------------------------ teacher ranks
    def serve_teacher(self) -> Dict[str, Any]:
        from ..teacher.stream import serve

        cfg = self.cfg
        student_cfg = _student_config(cfg)
        runner, tmodel = load_teacher_runner(
            cfg, self.device, student_config=student_cfg if (cfg.loss.features or cfg.loss.relation) else None)
        check_shared_vocab(self.tokenizer, student_cfg, tmodel.config, tokenizer_for_model(cfg.teacher.path))
        colocated = ColocatedTeacher(runner, device=self.device, seed=cfg.run.seed, dp_rank=0, method=cfg.teacher.method)
        GA = cfg.train.grad_accum
        t0 = time.time()
        on_policy = None
        if cfg.loss.on_policy is not None and cfg.loss.on_policy.fraction > 0:
            from .onpolicy import is_on_policy

            on_policy = lambda t: is_on_policy(cfg.run.seed, t, cfg.loss.on_policy.fraction)  # noqa: E731
        n = serve(self.topo, colocated, self.stream, self.start_step * GA, self.end_step * GA,
                  prefetch=cfg.teacher.prefetch, logprob_dtype=cfg.teacher.logprob_dtype,
                  vocab_size=int(tmodel.config.vocab_size), bitpack_ids=cfg.teacher.bitpack_ids,
                  timeout_s=cfg.train.dist_timeout_s, on_policy=on_policy,
                  sampled=cfg.loss.on_policy is not None and cfg.loss.on_policy.objective == "sampled_reverse_kl")
        return {"role": "teacher", "teacher_rank": self.topo.rank, "micro_batches_sent": n,
                "elapsed_s": time.time() - t0, "output_dir": cfg.run.output_dir}


def _peak_memory_gb(device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (process high-water mark)
    except Exception:
        return None


def _transform_kwargs(config) -> dict:
    from .families import logit_transform

    s, c = logit_transform(config, "student")
    return dict(logit_scale=s, softcap=c)


def _guard_logits(trainer, bd) -> None:
    """First micro-batch: student's (and the colocated teacher's) engine logits == model(...).logits."""
    from .families import check_logits_path

    check_logits_path(trainer.student, bd.input_ids, bd.attention_mask, key="student")
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is not None:
        check_logits_path(teacher, bd.input_ids, bd.attention_mask, key="teacher")


def _teacher_config(cfg: Config):
    """The teacher's model config without its weights (feature-map sizes on student ranks in stream mode)."""
    if cfg.teacher.init is not None:
        from .families import init_config

        return init_config(cfg.teacher.init, "teacher")
    return load_model_config(cfg.teacher.path, key="teacher.path")


def _student_config(cfg: Config):
    if cfg.student.init is not None:
        from .families import init_config

        return init_config(cfg.student.init, "student")
    return load_model_config(cfg.student.path, key="student.path")
