"""The math of single LoRA layers against plain hand-written references: Linear, GPT-2 Conv1D, Embedding
and Conv2d; scaling (alpha / r, rsLoRA alpha / sqrt(r)), DoRA, dropout, merging, and the shared-parameter
design of layers.WrapsBase (the wrapper and its base module hold the very same tensors)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from helpers import randomize
from lorakit import LoraConv2d, LoraEmbedding, LoraLinear
from lorakit.lora.delta import keep_mask
from lorakit.lora.layers import LoraLayer, lora_layer_class

KINDS = ["linear", "conv1d", "embedding", "conv2d"]
HYPO = settings(max_examples=25, deadline=None, derandomize=True)


# --- building layers and inputs -------------------------------------------------------------------
def make_base(kind: str, d_in: int = 7, d_out: int = 5, bias: bool = True, kernel: int = 3, stride: int = 1,
              padding: int = 1, dtype=torch.float64, seed: int = 0) -> nn.Module:
    """A plain base module with random weights and (if it has one) a nonzero bias."""
    torch.manual_seed(seed)
    if kind == "linear":
        base = nn.Linear(d_in, d_out, bias=bias)
    elif kind == "conv1d":
        base = Conv1D(d_out, d_in)  # nf = d_out, nx = d_in; weight stored d_in x d_out
        nn.init.normal_(base.weight, std=0.3)
    elif kind == "embedding":
        base = nn.Embedding(d_in, d_out)  # d_in = vocabulary size, d_out = embedding dim
    elif kind == "conv2d":
        base = nn.Conv2d(d_in, d_out, kernel, stride=stride, padding=padding, bias=bias)
    else:
        raise ValueError(kind)
    if getattr(base, "bias", None) is not None:
        nn.init.normal_(base.bias, std=0.5)
    return base.to(dtype).eval()


def make_input(kind: str, d_in: int = 7, batch: int = 3, seq: int = 4, hw: int = 6, dtype=torch.float64,
               seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, d_in, (batch, seq), generator=g)
    if kind == "conv2d":
        return torch.randn(batch, d_in, hw, hw, generator=g, dtype=dtype)
    return torch.randn(batch, seq, d_in, generator=g, dtype=dtype)


def wrap(base: nn.Module, name: str = "a", r: int = 3, alpha: float = 6.0, dropout: float = 0.0,
         use_rslora: bool = False, use_dora: bool = False, init=False, active: bool = True) -> LoraLayer:
    """Wrap `base` in the LoRA layer for its type with one adapter (random A and B unless init says)."""
    cls = lora_layer_class(base)
    assert cls is not None
    layer = cls(base)
    layer.add_adapter(name, r, alpha, dropout, use_rslora, use_dora, init)
    if active:
        layer.active_adapters = [name]
    return layer.eval()


def lora_AB(layer: LoraLayer, name: str = "a") -> tuple[torch.Tensor, torch.Tensor]:
    """The raw A and B tensors, as a user would read them from the state dict."""
    sd = layer.state_dict()
    if isinstance(layer, LoraEmbedding):
        return sd[f"lora_embedding_A.{name}"], sd[f"lora_embedding_B.{name}"]
    return sd[f"lora_A.{name}.weight"], sd[f"lora_B.{name}.weight"]


# --- hand references ------------------------------------------------------------------------------
def ref_base(kind: str, base_state: dict[str, torch.Tensor], x: torch.Tensor, stride=1, padding=1) -> torch.Tensor:
    W, b = base_state["weight"], base_state.get("bias")
    if kind == "linear":
        return x @ W.T + (0 if b is None else b)
    if kind == "conv1d":
        return x @ W + b  # transformers' Conv1D: x W + b, W stored in x out
    if kind == "embedding":
        return W[x]
    return F.conv2d(x, W, b, stride=stride, padding=padding)


def ref_lora(kind: str, A: torch.Tensor, B: torch.Tensor, s: float, x: torch.Tensor, stride=1, padding=1):
    """scaling * B A applied to x, by hand."""
    if kind in ("linear", "conv1d"):
        return s * ((x @ A.T) @ B.T)
    if kind == "embedding":  # A: r x vocab, B: dim x r (PEFT's layout)
        return s * (A.T[x] @ B.T)
    return s * F.conv2d(F.conv2d(x, A, stride=stride, padding=padding), B)  # conv A, then 1x1 conv B


def ref_delta(kind: str, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """scaling * B A, in the layout of the base weight, by hand."""
    if kind == "linear":
        return s * B @ A
    if kind == "conv1d":
        return (s * B @ A).T
    if kind == "embedding":
        return (s * B @ A).T
    out = torch.zeros(B.shape[0], A.shape[1], A.shape[2], A.shape[3], dtype=A.dtype)
    for o in range(B.shape[0]):  # one conv with kernel k: sum_r B[o, r] A[r]
        for k in range(A.shape[0]):
            out[o] += B[o, k, 0, 0] * A[k]
    return s * out


def base_state(base: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in base.state_dict().items()}


# --- the layer's output and delta weight vs the hand reference ------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_layer_output_and_delta_match_hand_reference(kind, use_rslora):
    base = make_base(kind)
    before = base_state(base)
    x = make_input(kind)
    layer = wrap(base, r=3, alpha=5.0, use_rslora=use_rslora)
    randomize(layer, "a", seed=3, scale=0.5)
    s = 5.0 / math.sqrt(3) if use_rslora else 5.0 / 3
    assert layer.scaling["a"] == pytest.approx(s, rel=1e-12)
    A, B = lora_AB(layer)
    with torch.no_grad():
        out = layer(x)
        expected = ref_base(kind, before, x) + ref_lora(kind, A, B, s, x)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer.delta_weight("a"), ref_delta(kind, A, B, s), atol=1e-12, rtol=1e-10)
        # and the delta applied to x is the adapter's contribution (the layer is linear in x for these inputs)
        assert (out - ref_base(kind, before, x)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_leaves_output_unchanged(kind, init):
    base = make_base(kind)
    x = make_input(kind)
    with torch.no_grad():
        expected = base(x)
    layer = wrap(base, init=init)
    A, B = lora_AB(layer)
    if kind == "embedding":  # PEFT's embedding init: A zero, B normal
        assert torch.count_nonzero(A) == 0 and torch.count_nonzero(B) > 0
    else:  # A random, B zero
        assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    if init == "gaussian" and kind != "embedding":
        assert A.std().item() == pytest.approx(1 / 3, rel=0.5)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_init_false_changes_output(kind):
    base = make_base(kind)
    x = make_input(kind)
    with torch.no_grad():
        expected = base(x)
        got = wrap(base, init=False)(x)
    assert (got - expected).abs().max() > 1e-3


def test_gaussian_init_std_is_one_over_r():
    layer = wrap(make_base("linear", d_in=400, d_out=3), r=4, init="gaussian")
    A, B = lora_AB(layer)
    assert A.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert torch.count_nonzero(B) == 0


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 8.0), (16, 4.0), (7, 3.5)])
def test_scaling(r, alpha, use_rslora):
    layer = wrap(make_base("linear"), r=r, alpha=alpha, use_rslora=use_rslora)
    assert layer.r["a"] == r
    expected = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.scaling["a"] == pytest.approx(expected, rel=1e-12)


# --- property test over shapes and ranks ----------------------------------------------------------
@HYPO
@given(kind=st.sampled_from(KINDS), d_in=st.integers(1, 9), d_out=st.integers(1, 9), r=st.integers(1, 6),
       alpha=st.floats(0.25, 32.0), use_rslora=st.booleans(), bias=st.booleans(), batch=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2))
def test_property_layer_math(kind, d_in, d_out, r, alpha, use_rslora, bias, batch, kernel, stride):
    if kind == "embedding":
        d_in = d_in + 1  # vocabulary of at least 2
    padding = kernel // 2
    base = make_base(kind, d_in, d_out, bias=bias, kernel=kernel, stride=stride, padding=padding)
    before = base_state(base)
    x = make_input(kind, d_in, batch=batch, hw=5)
    layer = wrap(base, r=r, alpha=alpha, use_rslora=use_rslora)
    randomize(layer, "a", seed=3, scale=0.5)
    A, B = lora_AB(layer)
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.scaling["a"] == pytest.approx(s, rel=1e-12)
    with torch.no_grad():
        out = layer(x)
        expected = ref_base(kind, before, x, stride, padding) + ref_lora(kind, A, B, s, x, stride, padding)
        torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)
        delta = ref_delta(kind, A, B, s)
        torch.testing.assert_close(layer.delta_weight("a"), delta, atol=1e-10, rtol=1e-9)
        # merging folds exactly that delta in; the merged layer computes the same; unmerging restores W
        layer.merge(["a"])
        assert layer.merged_adapters == ["a"]
        torch.testing.assert_close(layer.weight, before["weight"] + delta, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(layer(x), expected, atol=1e-9, rtol=1e-9)
        layer.unmerge()
        assert layer.merged_adapters == []
        torch.testing.assert_close(layer.weight, before["weight"], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(layer(x), expected, atol=1e-9, rtol=1e-9)


# --- DoRA -----------------------------------------------------------------------------------------
def ref_dora(kind: str, before: dict, A, B, s, m, x) -> torch.Tensor:
    """m * (W + sBA) x / ||W + sBA||_row + bias, with W as d_out x d_in."""
    W = before["weight"].T if kind == "conv1d" else before["weight"]
    W_adapted = W + s * B @ A
    norm = torch.linalg.norm(W_adapted, dim=1)
    out = (x @ W_adapted.T) * (m / norm)
    return out if before.get("bias") is None else out + before["bias"]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_output_matches_hand_reference(kind, bias):
    base = make_base(kind, bias=bias)
    before = base_state(base)
    x = make_input(kind)
    layer = wrap(base, r=3, alpha=6.0, use_dora=True)
    randomize(layer, "a", seed=3, scale=0.5)  # magnitude away from ||W + sBA|| so the normalisation matters
    A, B = lora_AB(layer)
    m = layer.state_dict()["lora_magnitude_vector.a"]
    assert m.shape == (5,)
    with torch.no_grad():
        expected = ref_dora(kind, before, A, B, 2.0, m, x)
        torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)
        plain = ref_base(kind, before, x) + ref_lora(kind, A, B, 2.0, x)
        assert (expected - plain).abs().max() > 1e-3  # DoRA really differs from plain LoRA here
        # merge: W' = m / ||W + sBA|| * (W + sBA); same output; unmerge restores W
        layer.merge(["a"])
        torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, before["weight"], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_initial_magnitude_is_row_norm_and_output_unchanged(kind):
    base = make_base(kind)
    before = base_state(base)
    x = make_input(kind)
    layer = wrap(base, use_dora=True, init=True)
    W = before["weight"].T if kind == "conv1d" else before["weight"]
    torch.testing.assert_close(layer.state_dict()["lora_magnitude_vector.a"], torch.linalg.norm(W, dim=1),
                               atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref_base(kind, before, x), atol=1e-12, rtol=0)


@HYPO
@given(kind=st.sampled_from(["linear", "conv1d"]), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       r=st.integers(1, 6), alpha=st.floats(0.25, 16.0), use_rslora=st.booleans(), bias=st.booleans())
def test_property_dora(kind, d_in, d_out, r, alpha, use_rslora, bias):
    base = make_base(kind, d_in, d_out, bias=bias or kind == "conv1d")
    before = base_state(base)
    x = make_input(kind, d_in)
    layer = wrap(base, r=r, alpha=alpha, use_rslora=use_rslora, use_dora=True)
    randomize(layer, "a", seed=3, scale=0.5)
    A, B = lora_AB(layer)
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    m = layer.state_dict()["lora_magnitude_vector.a"]
    with torch.no_grad():
        expected = ref_dora(kind, before, A, B, s, m, x)
        torch.testing.assert_close(layer(x), expected, atol=1e-9, rtol=1e-9)
        layer.merge(["a"])
        torch.testing.assert_close(layer(x), expected, atol=1e-9, rtol=1e-9)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, before["weight"], atol=1e-9, rtol=1e-9)


def test_dora_gradients_reach_magnitude_and_factors():
    layer = wrap(make_base("linear", dtype=torch.float32), use_dora=True, init=False).train()
    x = make_input("linear", dtype=torch.float32)
    layer(x).pow(2).sum().backward()
    for name, p in layer.adapter_parameters("a").items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dora_refused_for_embedding_and_conv2d():
    for kind in ("embedding", "conv2d"):
        layer = lora_layer_class(make_base(kind))(make_base(kind))
        with pytest.raises(ValueError, match="DoRA"):
            layer.add_adapter("a", 2, 2.0, 0.0, False, True, True)


# --- dropout: only on the adapter's input ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dropout_applies_to_adapter_path_only(kind):
    base = make_base(kind)
    before = base_state(base)
    x = make_input(kind)
    layer = wrap(base, dropout=0.5).train()
    A, B = lora_AB(layer)
    torch.manual_seed(7)
    with torch.no_grad():
        got = layer(x)
    torch.manual_seed(7)
    if kind == "conv2d":
        dropped = F.dropout(x, 0.5, training=True)
    else:  # Linear and Conv1D draw their mask in lorakit.lora.delta
        dropped = x * keep_mask(x.shape, 0.5, x.device) / 0.5
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(got, ref_base(kind, before, x) + ref_lora(kind, A, B, 2.0, dropped), atol=1e-10,
                               rtol=1e-10)
    with torch.no_grad():  # eval: no dropout
        torch.testing.assert_close(layer.eval()(x), ref_base(kind, before, x) + ref_lora(kind, A, B, 2.0, x),
                                   atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_with_dropout_in_training(kind):
    """Training with dropout: dropout reaches only the low-rank branch, b + (m/n) (W x + s B A drop(x)).
    (PEFT rescales W drop(x) instead, from a second pass through W; the expectation is the same.)"""
    base = make_base(kind)
    before = base_state(base)
    x = make_input(kind)
    layer = wrap(base, r=2, alpha=3.0, dropout=0.5, use_dora=True).train()
    randomize(layer, "a", seed=3, scale=0.5)
    A, B = lora_AB(layer)
    m = layer.state_dict()["lora_magnitude_vector.a"]
    W = before["weight"].T if kind == "conv1d" else before["weight"]
    torch.manual_seed(11)
    with torch.no_grad():
        got = layer(x)
    torch.manual_seed(11)
    dropped = x * keep_mask(x.shape, 0.5, x.device) / 0.5
    mag = m / torch.linalg.norm(W + 1.5 * B @ A, dim=1)
    expected = before["bias"] + mag * (x @ W.T + 1.5 * (dropped @ A.T @ B.T))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    with torch.no_grad():  # eval: exactly DoRA on x
        torch.testing.assert_close(layer.eval()(x), ref_dora(kind, before, A, B, 1.5, m, x), atol=1e-10, rtol=1e-10)


# --- several adapters in one layer ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_two_active_adapters_add_up_and_merge_stack(kind):
    base = make_base(kind)
    before = base_state(base)
    x = make_input(kind)
    layer = wrap(base, "a", r=2, alpha=4.0)
    layer.add_adapter("b", 3, 1.5, 0.0, True, False, False)
    randomize(layer, "a", seed=10, scale=0.5)
    randomize(layer, "b", seed=11, scale=0.5)
    (Aa, Ba), (Ab, Bb) = lora_AB(layer, "a"), lora_AB(layer, "b")
    sa, sb = 2.0, 1.5 / math.sqrt(3)
    ref = ref_base(kind, before, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref + ref_lora(kind, Aa, Ba, sa, x), atol=1e-10, rtol=1e-10)
        layer.active_adapters = ["a", "b"]
        both = ref + ref_lora(kind, Aa, Ba, sa, x) + ref_lora(kind, Ab, Bb, sb, x)
        torch.testing.assert_close(layer(x), both, atol=1e-10, rtol=1e-10)
        layer.merge(["a"])
        layer.merge(["b"])
        assert layer.merged_adapters == ["a", "b"]
        torch.testing.assert_close(layer.weight, before["weight"] + ref_delta(kind, Aa, Ba, sa)
                                   + ref_delta(kind, Ab, Bb, sb), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer(x), both, atol=1e-10, rtol=1e-10)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, before["weight"], atol=1e-10, rtol=1e-10)
        layer.active_adapters = ["b"]
        torch.testing.assert_close(layer(x), ref + ref_lora(kind, Ab, Bb, sb, x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_adapter_leaves_no_trace(kind):
    layer = wrap(make_base(kind), "a")
    layer.add_adapter("b", 2, 2.0, 0.1, False, kind in ("linear", "conv1d"), False)
    layer.active_adapters = ["a", "b"]
    layer.delete_adapter("b")
    assert [k for k in layer.state_dict() if "b" in k.split(".")] == []
    assert [k for k in layer.state_dict() if "a" in k.split(".")]  # the other adapter is still there
    assert "b" not in layer.r and "b" not in layer.scaling and layer.active_adapters == ["a"]
    assert not [n for n, _ in layer.named_modules() if n.endswith(".b")]
    assert not [n for n, _ in layer.named_parameters() if ".b." in f".{n}."]


def test_merged_adapter_cannot_be_deleted():
    layer = wrap(make_base("linear"))
    layer.merge(["a"])
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("a")


# --- WrapsBase: the wrapper and its base share the same tensors -----------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_wrapper_shares_parameters_with_base(kind):
    base = make_base(kind, dtype=torch.float32)
    layer = wrap(base)
    assert layer.base_layer is base
    assert layer.weight is base.weight
    assert layer._parameters is base._parameters
    # the base's own state_dict keys are still the wrapper's, plus the adapter
    assert set(base.state_dict()) < set(layer.state_dict())
    assert all(k.startswith(("lora_", "weight", "bias")) for k in layer.state_dict())
    # loading through the wrapper reaches the base module
    new_w = torch.randn_like(base.weight)
    layer.load_state_dict({"weight": new_w}, strict=False)
    assert torch.equal(base.weight, new_w)
    # and so does replacing a parameter on the wrapper
    layer.weight = nn.Parameter(torch.zeros_like(base.weight))
    assert torch.count_nonzero(base.weight) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("convert", ["to", "double"])
def test_dtype_conversion_keeps_base_and_wrapper_in_sync(kind, convert):
    base = make_base(kind, dtype=torch.float32)
    layer = wrap(base)
    randomize(layer, "a", seed=3, scale=0.5)
    x = make_input(kind, dtype=torch.float64)
    layer = layer.to(torch.float64) if convert == "to" else layer.double()
    assert layer.weight is layer.base_layer.weight
    assert layer.base_layer.weight.dtype == torch.float64
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float64, name
    before = base_state(layer.base_layer)
    A, B = lora_AB(layer)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_base(kind, before, x) + ref_lora(kind, A, B, 2.0, x), atol=1e-12,
                               rtol=1e-12)
    # a later in-place change on the base is seen by the wrapper (and vice versa)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)
        out2 = layer(x)
    before["weight"] = before["weight"] * 2
    torch.testing.assert_close(out2, ref_base(kind, before, x) + ref_lora(kind, A, B, 2.0, x), atol=1e-12,
                               rtol=1e-12)


def test_deepcopy_keeps_sharing():
    layer = wrap(make_base("linear"))
    clone = copy.deepcopy(layer)
    assert clone.weight is clone.base_layer.weight
    assert clone.weight is not layer.weight
    x = make_input("linear")
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)
        clone.base_layer.weight.zero_()
        assert torch.count_nonzero(clone.weight) == 0 and torch.count_nonzero(layer.weight) > 0


def test_attributes_read_through_to_base():
    emb = wrap(nn.Embedding(10, 4, padding_idx=0).double())
    assert emb.padding_idx == 0 and emb.num_embeddings == 10
    conv1d = wrap(make_base("conv1d", d_in=6, d_out=4))
    assert conv1d.nf == 4 and conv1d.fan_in_fan_out is True
    assert conv1d.in_features == 6 and conv1d.out_features == 4
    lin = wrap(make_base("linear", d_in=6, d_out=4))
    assert lin.fan_in_fan_out is False and lin.in_features == 6 and lin.out_features == 4
    assert lora_layer_class(nn.LayerNorm(3)) is None
    assert lora_layer_class(make_base("conv2d")) is LoraConv2d
    assert lora_layer_class(make_base("embedding")) is LoraEmbedding
    assert lora_layer_class(make_base("conv1d")) is LoraLinear


def test_conv2d_with_groups_or_dilation_is_refused():
    with pytest.raises(ValueError, match="groups"):
        LoraConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="dilation"):
        LoraConv2d(nn.Conv2d(4, 4, 3, dilation=2))


# --- safe merge and disabling on a single layer ---------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite(kind, bad):
    layer = wrap(make_base(kind))
    with torch.no_grad():
        p = layer.lora_embedding_B["a"] if kind == "embedding" else layer.lora_B["a"].weight
        p.fill_(bad)
        if kind == "embedding":
            layer.lora_embedding_A["a"].fill_(1.0)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(["a"], safe_merge=True)
    assert torch.equal(layer.weight, before)
    assert layer.merged_adapters == []


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_layer_gives_base_output_even_when_merged(kind):
    base = make_base(kind)
    before = base_state(base)
    x = make_input(kind)
    layer = wrap(base)
    with torch.no_grad():
        adapted = layer(x)
        layer.merge(["a"])
        layer.disabled = True
        torch.testing.assert_close(layer(x), ref_base(kind, before, x), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(layer.weight, before["weight"], atol=1e-10, rtol=1e-10)
        layer.disabled = False
        torch.testing.assert_close(layer(x), adapted, atol=1e-10, rtol=1e-10)


def test_adapter_trains_in_fp32_over_half_base_and_output_keeps_base_dtype():
    base = make_base("linear", dtype=torch.bfloat16)
    layer = wrap(base)
    A, B = lora_AB(layer)
    assert A.dtype == B.dtype == torch.float32
    x = make_input("linear", dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = base(x).float() + ref_lora("linear", A, B, 2.0, x.float())
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


def test_a_module_to_save_trained_in_fp32_fits_a_bf16_model_without_autocast():
    """The trainer keeps trained copies in fp32 over a bf16 base (--torch_dtype bfloat16 --bf16 false): the copy
    takes the model's bf16 tensors in fp32 and gives back bf16, as the frozen original would."""
    from lorakit.lora.layers import ModulesToSave

    torch.manual_seed(0)
    wrapper = ModulesToSave(torch.nn.Linear(8, 3).bfloat16())
    wrapper.add_adapter("default")
    wrapper.active_adapter = "default"
    wrapper.modules_to_save["default"].float()
    x = torch.randn(2, 8).bfloat16()
    out = wrapper(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, wrapper.modules_to_save["default"](x.float()).bfloat16())
    same = ModulesToSave(torch.nn.Linear(8, 3))  # one dtype: called as is
    same.add_adapter("default")
    same.active_adapter = "default"
    assert torch.equal(same(x.float()), same.modules_to_save["default"](x.float()))
