"""HiddenStateDistiller with two tiny Hugging Face models of different width and depth."""
import pytest
import torch

from distill_engine.distiller import HiddenStateDistiller, uniform_layer_map
from distill_engine.reference.projection_loss import dense_projection_loss

transformers = pytest.importorskip("transformers")

VOCAB = 101


def _model(hidden, layers, seed):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models_and_states():
    student, teacher = _model(32, 2, 0), _model(48, 4, 1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    attn = torch.ones(2, 9, dtype=torch.long)
    attn[1, 6:] = 0  # right padding in the second sequence
    with torch.no_grad():
        hs = student(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        ht = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    return student, teacher, ids, attn, hs, ht


def test_uniform_layer_map_formula():
    assert uniform_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert uniform_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert uniform_layer_map(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert uniform_layer_map(4, 10) == [(0, 2), (1, 4), (2, 7), (3, 9)]  # 2.5 rounds up to 3
    assert uniform_layer_map(4, 1) == [(i, 0) for i in range(4)]  # deeper student: clamped at teacher layer 0
    for L_s, L_t in [(1, 1), (2, 7), (6, 32), (5, 3)]:
        pairs = uniform_layer_map(L_s, L_t)
        assert [s for s, _ in pairs] == list(range(L_s))
        assert pairs[-1][1] == L_t - 1 and all(0 <= t < L_t for _, t in pairs)


@pytest.mark.parametrize("layer_map,weights", [("uniform", None), ([(1, 3), (0, 2), (0, 0)], [0.5, 1.0, 2.0])])
def test_loss_is_weighted_sum_of_dense_pair_losses(models_and_states, layer_map, weights):
    student, teacher, _, attn, hs, ht = models_and_states
    dist = HiddenStateDistiller.from_models(student, teacher, layer_map=layer_map, weights=weights, backend="torch")
    pairs = uniform_layer_map(2, 4) if layer_map == "uniform" else layer_map
    assert list(dist.layer_pairs) == pairs and len(dist.projections) == len(pairs)
    loss = dist(hs, ht, attention_mask=attn)
    w = weights or [1.0] * len(pairs)
    ref = sum(wk * dense_projection_loss(hs[s + 1], p.weight, ht[t + 1], proj_bias=p.bias, mask=attn.bool())
              for wk, (s, t), p in zip(w, pairs, dist.projections))
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-7)
    # gradients reach every projection
    loss.backward()
    for p in dist.projections:
        assert p.weight.grad is not None and p.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("layer_map", ["uniform", [(0, 1), (1, 3), (1, 2)]])
def test_training_the_projections_lowers_the_loss(models_and_states, kind, layer_map):
    _, _, _, attn, hs, ht = models_and_states
    torch.manual_seed(3)
    dist = HiddenStateDistiller(32, 48, 2, 4, layer_map=layer_map, kind=kind)  # backend auto
    opt = torch.optim.Adam(dist.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = dist(hs, ht, attention_mask=attn)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in dist.parameters())


def test_student_receives_gradient_and_padding_is_ignored(models_and_states):
    student, teacher, ids, attn, _, ht = models_and_states
    dist = HiddenStateDistiller.from_models(student, teacher, kind="cosine")
    out = student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    loss = dist(out, ht, attention_mask=attn)  # a model output object works as well as the tuple
    loss.backward()
    emb = student.model.embed_tokens.weight.grad
    assert emb is not None and emb.abs().sum() > 0
    student.zero_grad()
    # changing the teacher's padded positions changes nothing
    ht2 = tuple(x.clone() for x in ht)
    for x in ht2[1:]:
        x[1, 6:] = 1e3
    with torch.no_grad():
        a = dist(out.hidden_states, ht, attention_mask=attn)
        b = dist(out.hidden_states, ht2, attention_mask=attn)
    torch.testing.assert_close(a, b)


def test_from_configs_and_repr():
    s_cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    t_cfg = transformers.LlamaConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=4)
    dist = HiddenStateDistiller.from_configs(s_cfg, t_cfg, bias=False)
    assert dist.projections[0].weight.shape == (48, 32) and dist.projections[0].bias is None
    assert "pairs=[(0, 1), (1, 3)]" in repr(dist)


@pytest.mark.parametrize("layer_map,match", [
    ([(2, 0)], "student layer 2 is outside"),
    ([(0, 4)], "teacher layer 4 is outside"),
    ([(-1, 0)], "student layer -1 is outside"),
    ([(0, -1)], "teacher layer -1 is outside"),
    ([], "empty"),
    ([(0, 1, 2)], r"layer_map\[0\] must be a"),
    ([(0, 1.0)], "must be an int"),
    ([(0, 1), (0, 1)], "repeats"),
    ("every_other", "layer_map must be 'uniform'"),
    (5, "layer_map must be"),
])
def test_bad_layer_maps_raise(layer_map, match):
    with pytest.raises(ValueError, match=match):
        HiddenStateDistiller(32, 48, 2, 4, layer_map=layer_map)


def test_bad_arguments_raise(models_and_states):
    _, _, _, attn, hs, ht = models_and_states
    with pytest.raises(ValueError, match="weights has 1 entries"):
        HiddenStateDistiller(32, 48, 2, 4, weights=[1.0])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        HiddenStateDistiller(32, 48, 2, 4, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="kind"):
        HiddenStateDistiller(32, 48, 2, 4, kind="l1")
    with pytest.raises(ValueError, match="student_layers"):
        HiddenStateDistiller(32, 48, 0, 4)
    with pytest.raises(ValueError, match="no attribute 'hidden_size'"):
        HiddenStateDistiller.from_configs(object(), object())
    dist = HiddenStateDistiller(32, 48, 2, 4)
    with pytest.raises(ValueError, match="teacher_hidden_states has 3 entries but the model has 4 layers"):
        dist(hs, hs)
    with pytest.raises(ValueError, match="student_hidden_states must be the tuple"):
        dist(hs[-1], ht)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        dist(hs, ht, attention_mask=attn[:, :-1])
    with pytest.raises(ValueError, match="attention_mask must be bool or integer"):
        dist(hs, ht, attention_mask=attn.float())
    wrong_width = HiddenStateDistiller(32, 64, 2, 4)  # d_t does not match the teacher's 48
    with pytest.raises(ValueError, match="teacher_hidden"):
        wrong_width(hs, ht)
    with pytest.raises(ValueError, match="student layer 0 has states"):
        dist(hs, tuple(x[:1] for x in ht))
