"""lorakit.quant.nf4 on its own (no bitsandbytes): dequantising to another dtype, other quant storage,
and the errors bad weights and bad 4-bit state dicts get. The bit-for-bit checks against bitsandbytes
are in tests/parity/test_nf4.py."""
import json

import pytest
import torch

from lorakit.quant import nf4


def test_dequantize_to_another_dtype():
    q = nf4.quantize_nf4(torch.randn(33, 70).to(torch.bfloat16))
    assert torch.equal(nf4.dequantize_nf4(q, torch.float32).to(torch.bfloat16), nf4.dequantize_nf4(q))


def test_state_dict_with_other_quant_storage():
    """transformers' bnb_4bit_quant_storage packs the bytes into e.g. bfloat16; the bytes are the same."""
    w = torch.randn(16, 64)
    sd = nf4.to_state_dict(nf4.quantize_nf4(w))
    sd["weight"] = sd["weight"].view(-1).view(torch.bfloat16)[:, None]
    assert torch.equal(nf4.dequantize_nf4(nf4.from_state_dict(sd)), nf4.dequantize_nf4(nf4.quantize_nf4(w)))


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight, message", [
    (torch.zeros(0, 64), r"shape \(0, 64\).*at least one dimension and one value"),
    (torch.tensor(1.5), r"shape \(\)"),
    (torch.ones(4, 64, dtype=torch.int8), "float32, float16 or bfloat16 weights, got torch.int8"),
    (torch.ones(4, 64, dtype=torch.float64), "got torch.float64"),
    (torch.tensor([1.0, float("nan")]), "NaN or infinite"),
    (torch.tensor([1.0, float("inf")]), "NaN or infinite"),
])
def test_quantize_errors(weight, message):
    with pytest.raises(ValueError, match=message):
        nf4.quantize_nf4(weight)


def test_quantize_argument_errors():
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64"):
        nf4.quantize_nf4(torch.ones(64), blocksize=48)
    with pytest.raises(TypeError, match="takes a torch.Tensor, got list"):
        nf4.quantize_nf4([1.0, 2.0])


def edited(sd, changes):
    """A copy of a state dict with keys replaced, or removed where the new value is None."""
    sd = {**sd, **changes}
    return {k: v for k, v in sd.items() if v is not None}


def meta_tensor(**meta):
    base = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [10, 64],
            "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}
    base.update(meta)
    return torch.tensor(list(json.dumps({k: v for k, v in base.items() if v is not None}).encode()),
                        dtype=torch.uint8)


QS = "weight.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize("changes, error, message", [
    ({"weight": None}, KeyError, r"'weight' is missing: a 4-bit weight needs its packed codes"),
    ({"weight.absmax": None}, KeyError, r"'weight.absmax' is missing"),
    ({"weight.quant_map": None}, KeyError, r"'weight.quant_map' is missing"),
    ({"weight.nested_absmax": None}, KeyError, r"'weight.nested_absmax' is missing.*double quantisation"),
    ({"weight.nested_quant_map": None}, KeyError, r"'weight.nested_quant_map' is missing"),
    ({QS: None}, KeyError, r"'weight.quant_state.bitsandbytes__nf4' is missing"),
    ({QS: None, "weight.quant_state.bitsandbytes__fp4": meta_tensor(quant_type="fp4")}, ValueError,
     "stored as FP4; only NF4"),
    ({QS: torch.tensor(list(b"{oops"), dtype=torch.uint8)}, ValueError, "is not JSON"),
    ({QS: meta_tensor(shape=None)}, ValueError, r"lacks 'shape'"),
    ({QS: meta_tensor(blocksize=48)}, ValueError, r"blocksize 48 is not one of"),
    ({QS: meta_tensor(dtype="int8")}, ValueError, r"dtype 'int8' is not one of"),
    ({QS: meta_tensor(shape=[10, 0])}, ValueError, r"shape \[10, 0\] must be"),
    ({QS: meta_tensor(shape=[10, 66])}, ValueError, r"weight has 320 torch.uint8 values, expected 330"),
    ({QS: meta_tensor(nested_offset=None)}, ValueError, r"lacks nested_offset, but \['weight.nested_absmax'"),
    ({QS: meta_tensor(nested_blocksize=128)}, ValueError, "nested_blocksize 128"),
    ({"weight.absmax": torch.zeros(9, dtype=torch.uint8)}, ValueError,
     r"weight.absmax has 9 torch.uint8 values, expected 10 torch.uint8 \(one uint8 code per 64 values\)"),
    ({"weight.absmax": torch.zeros(10)}, ValueError,
     r"weight.absmax has 10 torch.float32 values, expected 10 torch.uint8"),
    ({"weight.nested_absmax": torch.zeros(2)}, ValueError, r"weight.nested_absmax has 2 .* expected 1"),
    ({"weight.quant_map": torch.linspace(-1, 1, 16)}, ValueError, "not the NF4 table"),
])
def test_from_state_dict_errors(changes, error, message):
    sd = nf4.to_state_dict(nf4.quantize_nf4(torch.randn(10, 64)))
    with pytest.raises(error, match=message):
        nf4.from_state_dict(edited(sd, changes))


def test_from_state_dict_errors_without_double_quant():
    sd = nf4.to_state_dict(nf4.quantize_nf4(torch.randn(10, 64), double_quant=False))
    with pytest.raises(ValueError, match=r"weight.absmax has 10 torch.uint8 values, expected 10 torch.float32"):
        nf4.from_state_dict(edited(sd, {"weight.absmax": torch.zeros(10, dtype=torch.uint8)}))
    with pytest.raises(KeyError, match=r"'weight.nested_quant_map' is missing"):  # half a double quantisation
        nf4.from_state_dict(edited(sd, {"weight.nested_absmax": torch.zeros(1)}))
