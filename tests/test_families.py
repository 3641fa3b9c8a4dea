"""The family matrix (issue 12): every popular causal-LM family as student and teacher, built from tiny random
configs here (no download) through ``student.init``'s path (``families.init_config``, ``model_type``).

Per family, in this process: (a) the engine's objective for one micro-batch — teacher targets from
``TeacherHead`` (base model → lm_head weight/bias → the family's logit transform → ``teacher_targets``), the
student's fused loss from ``DistillStudent`` — equals the same objective computed densely in float64 from
``model(...).logits`` of the same HF models (top-k targets + exact tail bucket + CE term), loss and every
student gradient within 1e-5 relative (fp32); (b) ``save_pretrained`` → ``load_model`` round-trips.
Families missing from the installed transformers are skipped. ``python tests/test_families.py`` prints the
README table from FAMILIES.
"""
import os
import subprocess
import sys

import pytest
import torch

V = 97  # prime vocabulary
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, **_IDS)
# name → (model_type, config overrides, logit transform as the README states it)
FAMILIES = {
    "Llama": ("llama", {}, "—"),
    "Mistral": ("mistral", dict(sliding_window=None), "—"),
    "Qwen2": ("qwen2", {}, "—"),
    "Qwen3": ("qwen3", dict(head_dim=8), "—"),
    "Qwen3-MoE": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    decoder_sparse_step=1), "—"),
    "Gemma": ("gemma", dict(head_dim=8), "—"),
    "Gemma 2": ("gemma2", dict(head_dim=8, final_logit_softcapping=3.0, sliding_window=16),
                "soft-cap `final_logit_softcapping`"),
    "Gemma 3": ("gemma3_text", dict(head_dim=8, final_logit_softcapping=3.0, sliding_window=16),
                "soft-cap `final_logit_softcapping`"),
    "Phi-3": ("phi3", {}, "—"),
    "OLMo 2": ("olmo2", {}, "—"),
    "Granite": ("granite", dict(logits_scaling=4.0), "÷ `logits_scaling`"),
    "Cohere": ("cohere", dict(logit_scale=0.5), "× `logit_scale`"),
    "Falcon-H1": ("falcon_h1", dict(lm_head_multiplier=0.7, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                    mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8), "× `lm_head_multiplier`"),
    "MiniCPM3": ("minicpm3", dict(num_key_value_heads=4, dim_model_base=16, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=8, v_head_dim=8), "hidden ÷ `hidden_size/dim_model_base`"),
    "HyperCLOVA X": ("hyperclovax", dict(logits_scaling=0.5), "× `logits_scaling`"),
    "GPT-2": ("gpt2", None, "— (tied head)"),
    "GPT-NeoX": ("gpt_neox", "neox", "— (untied `embed_out`/`lm_head`)"),
    "StableLM": ("stablelm", {}, "—"),
}
K, T, CE = 6, 1.5, 0.3


def family_init(name: str) -> dict:
    mt, extra, _ = FAMILIES[name]
    if extra is None:  # GPT-2 spells its sizes its own way
        return dict(model_type=mt, vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                    initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_IDS)
    if extra == "neox":
        return dict(model_type=mt, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2, **_IDS)
    return dict(_BASE, model_type=mt, **extra)


def _build(name, seed):
    from transformers import CONFIG_MAPPING

    from distill_engine.trainer.families import init_config, model_from_config

    mt = FAMILIES[name][0]
    if mt not in CONFIG_MAPPING:
        pytest.skip(f"model_type {mt!r} is not in the installed transformers")
    cfg = init_config(family_init(name), "student")
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_from_config(cfg).float().eval()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 11), generator=g)
    am = torch.ones_like(ids)
    am[1, 8:] = 0  # right padding
    nxt = am[:, 1:].reshape(-1)  # position t predicts token t+1: a loss row when t+1 is real
    valid = nxt.nonzero().flatten()
    labels = ids[:, 1:].reshape(-1)[valid]
    return ids, am, valid, labels


def _close(got, want, rtol=1e-5):
    got, want = got.detach().double(), want.detach().double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(float(want.abs().max()), 1e-6))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_objective_equals_dense_from_hf_logits(name, tmp_path):
    from distill_engine.reference.distill_loss import dense_distill_loss
    from distill_engine.teacher.colocated import TeacherHead, lm_head_of, rows
    from distill_engine.trainer.families import check_logits_path, logit_transform
    from distill_engine.trainer.models import load_model
    from distill_engine.trainer.student import DistillStudent, FusedHeadLoss

    teacher, student = _build(name, 1), _build(name, 0)
    ids, am, valid, labels = _batch(2)

    # the teacher, engine path vs the HF forward's logits (float64 top-k + exact rest mass)
    t_ids, t_lps, _, t_rest = TeacherHead(teacher, k=K, temperature=T, method="topk", backend="auto")(ids, am, valid)[:4]
    with torch.no_grad():
        t_logits = rows(teacher(input_ids=ids, attention_mask=am).logits, valid).double()  # [n, V]
    lp_full = torch.log_softmax(t_logits / T, dim=1)
    d_lps, d_ids = lp_full.topk(K, dim=1)
    assert torch.equal(t_ids.long(), d_ids), name
    _close(t_lps, d_lps)
    d_rest = torch.logsumexp(lp_full.scatter(1, d_ids, float("-inf")), dim=1)
    _close(t_rest, d_rest)

    # the student: fused loss on its lm_head weight vs the dense loss on model(...).logits (identity "head")
    s, c = logit_transform(student.config, "student")
    head = FusedHeadLoss(lm_head_of(student), divergence="forward_kl", beta=0.5, temperature=T, ce_weight=CE,
                         tail="bucket", backend="auto", zero3=False, logit_scale=s, softcap=c)
    module = DistillStudent(student, head)
    loss, _ = module(ids, am, valid, labels, t_ids, t_lps, validate=True, teacher_rest_logprob=t_rest)
    params = [p for p in student.parameters() if p.requires_grad]
    g_fused = torch.autograd.grad(loss, params, allow_unused=True)
    s_logits = rows(student(input_ids=ids, attention_mask=am, use_cache=False).logits, valid)  # [n, V]
    dense = dense_distill_loss(s_logits, torch.eye(V, dtype=torch.float64), d_ids, d_lps, labels=labels,
                               temperature=T, ce_weight=CE, tail="bucket", reduction="sum",
                               teacher_rest_logprob=d_rest)
    g_dense = torch.autograd.grad(dense, params, allow_unused=True)
    _close(loss, dense)
    for p, a, b in zip(params, g_fused, g_dense):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        _close(a, b)

    # the guard passes on both, and save_pretrained → load_model round-trips (weights, transform, logits)
    check_logits_path(student, ids, am, key="student")
    check_logits_path(teacher, ids, am, key="teacher")
    student.save_pretrained(str(tmp_path / "s"))
    back = load_model(str(tmp_path / "s"), None, key="student", dtype=torch.float32, attn="eager").eval()
    assert type(back) is type(student) and logit_transform(back.config, "s") == (s, c)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=am).logits,
                                   student(input_ids=ids, attention_mask=am).logits, rtol=0, atol=0)


def test_init_refuses_unknown_keys_and_types():
    from distill_engine.trainer.families import init_config

    with pytest.raises(ValueError, match=r"student.init: hiden_size not known to LlamaConfig"):
        init_config(dict(hiden_size=32), "student")
    with pytest.raises(ValueError, match=r"teacher.init: final_logit_softcap not known to Gemma2Config"):
        init_config(dict(model_type="gemma2", final_logit_softcap=30.0), "teacher")
    with pytest.raises(ValueError, match=r"student.init.model_type='vit' is not a causal-LM model type"):
        init_config(dict(model_type="vit"), "student")
    assert type(init_config(dict(hidden_size=32, num_attention_heads=4), "s")).__name__ == "LlamaConfig"


def test_unknown_transforms_are_refused(tmp_path):
    from transformers import LlamaConfig

    from distill_engine.trainer.families import check_logits_path, logit_transform

    cfg = LlamaConfig()
    cfg.logit_scale = 2.0  # a transform key on a family the table does not know
    with pytest.raises(ValueError, match=r"model type 'llama' sets logit_scale=2.0.*does not implement"):
        logit_transform(cfg, "teacher")
    # the same from a checkpoint directory, before the weights are loaded
    import json

    from distill_engine.trainer.models import load_model

    d = tmp_path / "odd"
    _build("Llama", 0).save_pretrained(str(d))
    raw = json.loads((d / "config.json").read_text())
    raw["lm_head_multiplier"] = 0.5
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"teacher.path: model type 'llama' sets lm_head_multiplier=0.5"):
        load_model(str(d), None, key="teacher", dtype=torch.float32, attn="eager")

    # a model whose forward transforms its logits in a way no key announces: the guard stops it
    model = _build("Llama", 0)
    orig = type(model).forward

    def forward(self, *a, **kw):
        out = orig(self, *a, **kw)
        out.logits = out.logits * 1.7
        return out

    model.forward = forward.__get__(model)
    ids, am, _, _ = _batch(0)
    with pytest.raises(ValueError, match=r"student: model type 'llama': the engine's logits path .* differs"):
        check_logits_path(model, ids, am, key="student")


def test_padded_vocabularies_teacher_larger_than_tokenizer_and_student():
    """Rule: the teacher's targets are over the tokenizer's n_tok tokens only (its padding rows dropped before its
    softmax); the student's softmax runs over all its rows, so its padding rows sit in the rest bucket and get
    exactly the dense gradient. Teacher V=103 > student V=101 > n_tok=89."""
    from distill_engine.data.tokenizer import check_shared_vocab
    from distill_engine.reference.distill_loss import dense_distill_loss
    from distill_engine.teacher.colocated import TeacherHead, lm_head_of, rows
    from distill_engine.trainer.families import init_config, model_from_config
    from distill_engine.trainer.student import DistillStudent, FusedHeadLoss

    n_tok = 89

    def build(mt, v, seed, **kw):
        cfg = init_config(dict(_BASE, model_type=mt, vocab_size=v, **kw), "x")
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        return model_from_config(cfg).float().eval()

    teacher, student = build("qwen2", 103, 1), build("qwen3", 101, 0, head_dim=8)

    class Tok:  # what check_shared_vocab reads
        def __len__(self):
            return n_tok

    check_shared_vocab(Tok(), student.config, teacher.config, allow_padded=True)
    with pytest.raises(ValueError, match="differs from student vocab_size"):
        check_shared_vocab(Tok(), student.config, teacher.config)  # the trainer allows padding for colocated only
    ids, am, valid, labels = _batch(6)
    ids = ids % n_tok
    labels = labels % n_tok
    th = TeacherHead(teacher, k=K, temperature=1.0, method="topk")
    th.vocab_limit = n_tok
    t_ids, t_lps, _, t_rest = th(ids, am, valid)[:4]
    assert int(t_ids.max()) < n_tok
    with torch.no_grad():
        full = torch.log_softmax(rows(teacher(input_ids=ids, attention_mask=am).logits, valid)[:, :n_tok].double(), 1)
    d_lps, d_ids = full.topk(K, dim=1)
    assert torch.equal(t_ids.long(), d_ids)
    _close(t_lps, d_lps)
    head = FusedHeadLoss(lm_head_of(student), divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=CE,
                         tail="bucket", backend="auto", zero3=False)
    loss, _ = DistillStudent(student, head)(ids, am, valid, labels, t_ids, t_lps, teacher_rest_logprob=t_rest)
    w = lm_head_of(student).weight
    (g_fused,) = torch.autograd.grad(loss, [w])
    s_logits = rows(student(input_ids=ids, attention_mask=am).logits, valid)  # [n, 101]: padding rows included
    dense = dense_distill_loss(s_logits, torch.eye(101, dtype=torch.float64), d_ids, d_lps, labels=labels,
                               ce_weight=CE, reduction="sum",
                               teacher_rest_logprob=torch.logsumexp(full.scatter(1, d_ids, float("-inf")), 1))
    (g_dense,) = torch.autograd.grad(dense, [w])
    _close(loss, dense)
    _close(g_fused, g_dense)
    assert float(g_dense[n_tok:].abs().max()) > 0  # the padding rows do get a (dense) gradient


def _flow(d):
    return "{" + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in d.items()) + "}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# (student, teacher): a soft-capped student with a tied-head teacher; an MoE student (router aux loss on,
# vocabulary padded to 272) with a soft-capped Gemma 2 teacher padded to 264 (one 257-token byte tokenizer) —
# each from a fresh 2-rank ZeRO-2 launch
LAUNCHES = [("Gemma 2", "GPT-2"), ("Qwen3-MoE", "Gemma 2")]


@pytest.mark.parametrize("student,teacher", LAUNCHES)
def test_mixed_family_pair_trains_zero2_two_ranks(student, teacher, tmp_path):
    """One optimizer step from the command a user types: torchrun, 2 ranks (gloo), DeepSpeed ZeRO-2."""
    import json

    from transformers import CONFIG_MAPPING

    for name in (student, teacher):
        if FAMILIES[name][0] not in CONFIG_MAPPING:
            pytest.skip(f"{name} is not in the installed transformers")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    s_init, t_init = dict(family_init(student), vocab_size=257), dict(family_init(teacher), vocab_size=257)
    if student == "Qwen3-MoE":  # router aux loss on, and padded vocabularies (tokenizer: 257 tokens)
        s_init.update(output_router_logits=True, router_aux_loss_coef=0.01, vocab_size=272)
        t_init.update(vocab_size=264)
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "distill_engine.cli", "train", "--config", os.path.join(repo, "examples", "tiny_cpu.yaml"),
           "--output-dir", str(out), "--set", "train.max_steps=1", "--set", "train.save_every=0",
           "--set", "train.zero_stage=2", "--set", "train.grad_accum=1", "--set", "train.log_every=1",
           "--set", "data.max_samples=16", "--set", "data.seq_len=32",
           "--set", f"student.init={_flow(s_init)}", "--set", f"teacher.init={_flow(t_init)}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=str(tmp_path))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["zero_stage"] == 2 and summary["engine"] == "deepspeed"
    with open(out / "metrics.jsonl") as f:
        rec = [json.loads(line) for line in f if line.strip()][-1]
    assert torch.isfinite(torch.tensor(rec["loss"])) and rec.get("grad_norm", 1.0) > 0
    if student == "Qwen3-MoE":  # the router aux loss is in the objective and reported
        assert rec["router_aux_loss"] > 0


def readme_table() -> str:
    """The README's family table, from FAMILIES (every row is a case of the matrix test above)."""
    from transformers import CONFIG_MAPPING

    out = ["| family | model_type | student | teacher | logit transform | tested |", "|---|---|---|---|---|---|"]
    for name, (mt, _, tr) in FAMILIES.items():
        ok = "yes" if mt in CONFIG_MAPPING else "skipped (not in installed transformers)"
        out.append(f"| {name} | `{mt}` | yes | yes | {tr} | {ok} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(readme_table())


def test_moe_router_aux_loss_is_kept_like_the_hf_forward():
    """Qwen3-MoE with output_router_logits: the engine's objective at ce_weight=1 (no teacher term) is the HF
    loss — mean CE + router_aux_loss_coef · aux — and so are the gradients; the aux is reported in stats[3]."""
    from distill_engine.teacher.colocated import lm_head_of
    from distill_engine.trainer.student import DistillStudent, FusedHeadLoss

    student = _build("Qwen3-MoE", 0)
    student.config.output_router_logits = True
    student.config.router_aux_loss_coef = 0.5  # large, so a lost aux term cannot hide in the tolerance
    student.router_aux_loss_coef = 0.5
    ids, am, valid, labels = _batch(4)
    n = valid.numel()
    head = FusedHeadLoss(lm_head_of(student), divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=1.0,
                         tail="bucket", backend="auto", zero3=False)
    module = DistillStudent(student, head)
    assert module.router is not None
    empty = torch.full((n, 1), -1, dtype=torch.int32)
    loss, stats = module(ids, am, valid, labels, empty, torch.full((n, 1), float("-inf")), scale=1.0 / n)
    params = [p for p in student.parameters()]
    g_ours = torch.autograd.grad(loss, params, allow_unused=True)
    hf_labels = ids.masked_fill(am == 0, -100)
    out = student(input_ids=ids, attention_mask=am, labels=hf_labels, output_router_logits=True)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    g_hf = torch.autograd.grad(out.loss, params, allow_unused=True)
    _close(loss, out.loss)
    _close(stats[3] / n, out.aux_loss)
    for a, b in zip(g_ours, g_hf):
        if b is not None:
            _close(a, b)


def test_eval_fuses_each_familys_transform(tmp_path):
    """distill-engine eval on a soft-capped teacher (Gemma 2) and a scaled student (Cohere): every per-slice
    metric equals the float64 dense computation from model(...).logits (the transforms are in the metrics)."""
    import json

    from _eval_tiny import make_tokenizer, save_model, write_eval_data
    from test_eval import _dense_slice_stats

    from distill_engine.eval import evaluate

    tok = make_tokenizer(tmp_path / "tok")
    v = len(tok)
    models = {}
    for role, name, seed in (("teacher", "Gemma 2", 1), ("student", "Cohere", 0)):
        init = dict(family_init(name), vocab_size=v, max_position_embeddings=128)
        from distill_engine.trainer.families import init_config, model_from_config

        cfg = init_config(init, role)
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        models[role] = save_model(model_from_config(cfg).float().eval(), tok, tmp_path / role)
    data = write_eval_data(tmp_path / "heldout.jsonl")
    report = evaluate(models["teacher"], models["student"], data, out_dir=str(tmp_path / "report"), max_length=64,
                      batch_size=3, chunk_rows=7, vocab_tile=50, progress=False)
    records = [json.loads(line) for line in open(data)]
    for sl in report["slices"]:
        texts = [r["text"] for r in records if r["slice"] == sl["name"]]
        ref = _dense_slice_stats(tok, models["teacher"], models["student"], texts)
        assert sl["teacher"]["ppl"] == pytest.approx(ref["teacher_ppl"], rel=1e-4)
        assert sl["student"]["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
        assert sl["student"]["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-6)
        assert sl["student"]["top1"] == pytest.approx(ref["top1"])
