"""The GPU path: bf16 base weights with fp32 adapters on CUDA. Runs where a CUDA device exists
(the lent GPU machine); CPU-only CI has none, and these tests say so instead of passing."""
import pytest
import torch

from helpers import build_model
from lorakit import LoraConfig, get_peft_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
INPUT = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _bf16_pair(use_dora: bool):
    """The same adapted Llama twice: fp32 on the CPU (reference) and bf16 base on CUDA."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    ref = get_peft_model(build_model("llama"), config)
    gpu = get_peft_model(build_model("llama").to("cuda", torch.bfloat16), config)
    gpu.load_state_dict({k: v.to("cuda") for k, v in ref.state_dict().items()})
    return ref, gpu


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_base_keeps_fp32_adapters_and_matches_fp32_reference(use_dora):
    ref, gpu = _bf16_pair(use_dora)
    adapter = [p for n, p in gpu.named_parameters() if "lora_" in n]
    assert adapter and all(p.dtype == torch.float32 and p.is_cuda for p in adapter)
    with torch.no_grad():
        expected = ref(input_ids=INPUT).logits
        got = gpu(input_ids=INPUT.cuda()).logits
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float().cpu(), expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_merge_matches_unmerged_output(use_dora):
    _, gpu = _bf16_pair(use_dora)
    x = INPUT.cuda()
    with torch.no_grad():
        unmerged = gpu(input_ids=x).logits.float()
        gpu.merge_adapter()
        merged = gpu(input_ids=x).logits.float()
    assert torch.allclose(merged, unmerged, atol=5e-2, rtol=5e-2)


def test_autocast_training_step_moves_only_adapters():
    model = get_peft_model(build_model("llama").cuda(), LoraConfig(r=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = INPUT.cuda()
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_peft_and_lorakit_agree_in_bf16():
    import peft

    config = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    ours = get_peft_model(build_model("llama").to("cuda", torch.bfloat16), LoraConfig(**config))
    theirs = peft.get_peft_model(build_model("llama").to("cuda", torch.bfloat16), peft.LoraConfig(**config))
    theirs_sd = theirs.state_dict()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.copy_(theirs_sd[name])  # PEFT names adapter weights the same way inside a model
        x = INPUT.cuda()
        assert torch.equal(ours(input_ids=x).logits, theirs(input_ids=x).logits)


def test_lorakit_train_on_cuda_uses_bf16_and_writes_a_peft_adapter(tiny_lm_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.train import loop
    from lorakit.train.args import parse_train_args

    out = tmp_path / "gpu-run"
    result = loop.train(parse_train_args(["--model", tiny_lm_dir, "--dataset", alpaca_file, "--output_dir", str(out),
                                          "--max_steps", "20", "--learning_rate", "3e-2", "--val_split_ratio", "0.25",
                                          "--report_to", "none", "--gradient_checkpointing"]))
    assert result["eval_loss"] < 0.8 * result["before_eval_loss"]
    config = (out / "run_config.yaml").read_text()
    assert "bf16: null" in config  # the default: bf16 autocast because a GPU is present
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[1, 40, 41, 42]])
    assert torch.isfinite(tuned(ids).logits).all()


def test_compiled_gpu_dequantize_matches_the_cpu_path():
    from torch import nn

    from lorakit.quant.linear4bit import NF4Linear

    layer = NF4Linear.from_linear(nn.Linear(1000, 300))  # 300000 values: blocks and a short tail
    on_cpu = layer.dequantize()
    on_gpu = layer.to("cuda").dequantize()
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=0)
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_qlora_train_on_cuda(tiny_lm_dir, alpaca_file, tmp_path):
    from lorakit.train import loop
    from lorakit.train.args import parse_train_args

    result = loop.train(parse_train_args(["--model", tiny_lm_dir, "--dataset", alpaca_file, "--output_dir",
                                          str(tmp_path / "q"), "--train_type", "qlora", "--max_steps", "20",
                                          "--learning_rate", "3e-2", "--val_split_ratio", "0.25",
                                          "--report_to", "none"]))
    assert result["eval_loss"] < 0.8 * result["before_eval_loss"]


@pytest.mark.parametrize("train_type", ["lora", "qlora"])
def test_fsdp_on_one_gpu_trains_checkpoints_and_resumes(tiny_lm_dir, alpaca_file, tmp_path, train_type):
    """--fsdp on one GPU: FSDP2 over nccl in a group of one, bf16 compute, the NF4 codes as sharded parameters,
    DCP checkpoints; resuming from step 10 ends where the uninterrupted run ends."""
    from helpers import adapter_weights, assert_same_weights
    from lorakit.train import loop
    from lorakit.train.args import parse_train_args

    def run(out, *extra):
        return loop.train(parse_train_args(["--model", tiny_lm_dir, "--dataset", alpaca_file, "--output_dir",
                                            str(out), "--train_type", train_type, "--fsdp", "--max_steps", "20",
                                            "--save_steps", "10", "--learning_rate", "3e-2", "--lora_dropout", "0",
                                            "--val_split_ratio", "0.25", "--report_to", "none", *extra]))

    result = run(tmp_path / "whole")
    assert result["eval_loss"] < 0.8 * result["before_eval_loss"]
    assert (tmp_path / "whole" / "checkpoint-10" / ".metadata").is_file()
    run(tmp_path / "resumed", "--resume", str(tmp_path / "whole" / "checkpoint-10"))
    assert_same_weights(adapter_weights(tmp_path / "resumed"), adapter_weights(tmp_path / "whole"), atol=1e-3)
