"""`--optim`: each name builds its optimiser with LoRA+'s groups; lorakit's 8-bit AdamW against its
definition and against float32 AdamW; the paged fallback said once; unknown names refused."""
import sys

import pytest
import torch
from torch import nn

from lorakit.train import optim
from lorakit.train.adam8bit import AdamW8bit, dequantize, dynamic_map, quantize
from lorakit.train.args import TrainArgs, parse_train_args


class LoraLayer(nn.Module):
    """A frozen weight with LoRA's parameter names (lora_A.default.weight, lora_B.default.weight)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8), requires_grad=False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8, bias=False)})


def build(name: str) -> tuple[torch.optim.Optimizer, nn.Module]:
    model = nn.ModuleDict({"q_proj": LoraLayer(), "v_proj": LoraLayer()})
    args = TrainArgs(optim=name, learning_rate=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    return optim.build_optimizer(model, args), model


@pytest.mark.parametrize("name, cls, settings", [
    ("adamw_torch", torch.optim.AdamW, {"betas": (0.9, 0.95), "eps": 1e-8, "fused": None}),
    ("adamw_torch_fused", torch.optim.AdamW, {"fused": True}),
    ("adamw_8bit", AdamW8bit, {"betas": (0.9, 0.95), "eps": 1e-8}),
    ("paged_adamw_8bit", AdamW8bit, {}),  # without CUDA: unpaged
    ("paged_adamw_32bit", torch.optim.AdamW, {"fused": None}),
    ("sgd", torch.optim.SGD, {"momentum": 0}),
    ("adafactor", "Adafactor", {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
])
def test_each_name_builds_its_optimiser_with_loraplus_groups(name, cls, settings):
    optimizer, model = build(name)
    assert type(optimizer).__name__ == cls if isinstance(cls, str) else type(optimizer) is cls
    assert {k: optimizer.defaults[k] for k in settings} == settings
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1.6e-2]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in optimizer.param_groups[1]["params"]) == [
        "q_proj.lora_B.default.weight", "v_proj.lora_B.default.weight"]
    assert sorted(names[id(p)] for p in optimizer.param_groups[0]["params"]) == [
        "q_proj.lora_A.default.weight", "v_proj.lora_A.default.weight"]


@pytest.mark.parametrize("flags, beta2", [
    ({}, 0.95), ({"train_type": "dora"}, 0.95), ({"train_type": "full"}, 0.999),
    ({"adam_beta2": 0.98}, 0.98), ({"train_type": "full", "adam_beta2": 0.9}, 0.9)])
def test_adam_beta2_defaults_to_095_with_adapters_and_0999_in_full(flags, beta2):
    model = nn.ModuleDict({"q_proj": LoraLayer()})
    optimizer = optim.build_optimizer(model, TrainArgs(learning_rate=1e-3, **flags))
    assert optimizer.defaults["betas"] == (0.9, beta2)


def test_paged_without_cuda_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(optim, "_said", set())
    for _ in range(3):
        build("paged_adamw_8bit")
    err = capsys.readouterr().err
    assert err.count("--optim paged_adamw_8bit: paged optimisers page their state through CUDA") == 1
    assert "this run uses adamw_8bit" in err
    build("paged_adamw_32bit")
    assert "this run uses adamw_torch" in capsys.readouterr().err
    build("adamw_8bit")
    assert capsys.readouterr().err == ""


def test_unknown_name_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"invalid choice: 'adam'.*'adamw_torch'.*'adamw_8bit'.*'adafactor'"):
        parse_train_args(["--optim", "adam"])
    assert parse_train_args([]).optim == "adamw_torch"
    assert parse_train_args(["--optim", "sgd"]).optim == "sgd"


def test_bitsandbytes_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="--optim adamw_8bit on CUDA uses bitsandbytes.*pip install bitsandbytes"):
        optim._bitsandbytes("adamw_8bit")


# --- lorakit's 8-bit AdamW ---------------------------------------------------------------------------


def test_dynamic_map_is_bitsandbytes_map():
    functional = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), functional.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_map_entry_per_block(signed):
    torch.manual_seed(0)
    x = torch.randn(256 * 12 + 100) * torch.logspace(-9, 1, 256 * 12 + 100)
    x = x if signed else x.abs()
    codes, absmax = quantize(x, signed)
    blocks = torch.nn.functional.pad(x, (0, 156)).view(-1, 256)
    torch.testing.assert_close(absmax, blocks.abs().amax(dim=1), rtol=0, atol=0)
    scaled = (blocks / absmax[:, None]).view(-1)[:x.numel()]
    error = (dynamic_map(signed)[codes[:x.numel()].long()] - scaled).abs()
    nearest = (dynamic_map(signed)[None, :] - scaled[:, None]).abs().amin(dim=1)
    assert torch.equal(error, nearest)
    back = dequantize(codes, absmax, signed, x.numel())
    half_gap = dynamic_map(signed).diff().max() / 2  # 0.9 / 128 signed, 0.9 / 256 unsigned
    assert ((back - x).abs() <= half_gap * (1 + 1e-5) * absmax.repeat_interleave(256)[:x.numel()]).all()


def fit(make, steps: int = 50) -> tuple[list[float], list[torch.Tensor]]:
    """Losses and final weights of a small MLP regression trained by `make(params)`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Linear(64, 8))
    x = torch.randn(512, 64)
    y = torch.tanh(x @ torch.randn(64, 8))
    optimizer, losses = make(model.parameters()), []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses, [p.detach().clone() for p in model.parameters()]


def test_8bit_adamw_tracks_float32_adamw():
    settings = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    start = fit(lambda p: torch.optim.SGD(p, lr=0), steps=1)[1]
    reference_losses, reference = fit(lambda p: torch.optim.AdamW(p, **settings))
    losses, weights = fit(lambda p: AdamW8bit(p, min_8bit_size=0, **settings))  # every state in 8 bits
    # measured: losses within 1e-4 of float32's at every step, each weight's travel off by <= 4%
    assert max(abs(a - b) for a, b in zip(losses, reference_losses)) < 5e-4
    assert losses[-1] < 0.1 * losses[0]
    for w, ref, w0 in zip(weights, reference, start):
        assert (w - ref).norm() <= 0.08 * (ref - w0).norm()


def test_8bit_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 80)), nn.Parameter(torch.randn(10))]  # 8-bit and float32 state

    def step(optimizer):
        for p in params:
            p.grad = torch.sin(p.detach() * 3)
        optimizer.step()

    first = AdamW8bit(params, lr=1e-2)
    step(first)
    torch.save(first.state_dict(), tmp_path / "optimizer.pt")
    assert set(first.state[params[0]]) == {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                           "exp_avg_sq_absmax"}
    assert set(first.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"}
    saved = [p.detach().clone() for p in params]
    step(first)
    expected = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    second = AdamW8bit(params, lr=1e-2)
    second.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    step(second)
    for p, e in zip(params, expected):
        assert torch.equal(p, e)
