"""`lorakit train` beyond one process: DDP and FSDP2 under torchrun (gloo on the CPU) against one process.

Every multi-process run takes the same global batch as the one-process reference (4 examples a step), in fp32
(--bf16 false: under bf16 the two ways of summing a batch round differently) with dropout 0, so the adapters
agree to float rounding. 26 training rows leave a last global batch of 2: one rank gets no examples there and
still joins the collectives.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import adapter_weights, alpaca_rows, assert_same_weights, quick_args, write_jsonl
from lorakit.train import distributed, fsdp
from lorakit.train.args import parse_train_args
from lorakit.train.resume import check_same_trajectory

CPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # gloo on the CPU, also on a GPU machine
COMMON = dict(lora_dropout=0, max_steps=-1, num_train_epochs=1, save_steps=3, val_split_ratio=0.2, bf16="false")


def train(model: str, data: str, out, processes: int = 1, *extra: str, **flags) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    done = subprocess.run([sys.executable, *(launcher if processes > 1 else []), "-m", "lorakit", "train",
                           *quick_args(model, data, out, **{**COMMON, **flags}), *extra],
                          capture_output=True, text=True, timeout=600, env=CPU)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def setup(tiny_lm_dir, tmp_path_factory):
    """(model, data, folder, the one-process reference run's folder)."""
    root = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(root / "rows.jsonl", alpaca_rows(32))  # 26 train / 6 eval
    train(tiny_lm_dir, data, root / "one", per_device_train_batch_size=4)
    return tiny_lm_dir, data, root, root / "one"


def eval_loss(folder) -> float:
    return json.loads((folder / "final_metrics.json").read_text())["eval_loss"]


@pytest.mark.slow
def test_ddp_with_accumulation_matches_one_process(setup):
    """DDP, 2 ranks x 1 example x 2 micro-batches (no_sync on the first) = 1 rank x 4 examples."""
    model, data, root, one = setup
    done = train(model, data, root / "ddp", 2, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    assert "data parallel (DDP)" in done.stdout and done.stdout.count("done:") == 1
    assert_same_weights(adapter_weights(root / "ddp"), adapter_weights(one), atol=1e-5)
    assert eval_loss(root / "ddp") == pytest.approx(eval_loss(one), rel=1e-5)


@pytest.mark.slow
def test_fsdp_lora_matches_one_process_and_shards_the_parameters(setup):
    model, data, root, one = setup
    done = train(model, data, root / "fsdp", 2, "--fsdp", per_device_train_batch_size=2)
    assert_same_weights(adapter_weights(root / "fsdp"), adapter_weights(one), atol=1e-5)
    assert eval_loss(root / "fsdp") == pytest.approx(eval_loss(one), rel=1e-5)
    assert_halved(done.stdout, "parameter bytes")
    checkpoint = root / "fsdp" / "checkpoint-3"
    assert (checkpoint / ".metadata").is_file() and (checkpoint / "__1_0.distcp").is_file()
    assert adapter_weights(checkpoint).keys() == adapter_weights(one).keys()  # the PEFT adapter, gathered
    assert not list(root.joinpath("fsdp").glob(".checkpoint-*"))  # temporary folders renamed


@pytest.mark.slow
def test_fsdp_on_one_process_runs_fsdp2_and_matches_the_plain_run(setup):
    """--fsdp without torchrun: a group of one, the same FSDP2 code path (units, DCP checkpoints) as several ranks."""
    model, data, root, one = setup
    done = train(model, data, root / "fsdp-one", 1, "--fsdp", per_device_train_batch_size=4)
    assert re.search(r"processes: 1, FSDP2: parameter bytes per rank \[(\d+)\] of \1\b", done.stdout), done.stdout
    assert (root / "fsdp-one" / "checkpoint-3" / ".metadata").is_file()
    assert_same_weights(adapter_weights(root / "fsdp-one"), adapter_weights(one), atol=1e-5)


def assert_halved(log: str, what: str) -> None:
    """Each of the 2 ranks holds half (within 5%) of `what`, as the run log reports it."""
    shares, whole = re.search(rf"{what} per rank \[([\d ]+)\] of (\d+)", log).groups()
    shares, whole = [int(s) for s in shares.split()], int(whole)
    print(f"FSDP2, 2 ranks: {what} per rank {shares} of {whole}")
    assert len(shares) == 2 and all(abs(s - whole / 2) <= 0.05 * whole for s in shares)


@pytest.mark.slow
def test_fsdp_qlora_shards_the_4bit_base_and_matches_one_process(setup):
    model, data, root, _ = setup
    train(model, data, root / "qlora-one", per_device_train_batch_size=4, train_type="qlora")
    done = train(model, data, root / "qlora-fsdp", 2, "--fsdp", per_device_train_batch_size=2, train_type="qlora")
    assert_halved(done.stdout, "4-bit base bytes")
    assert_same_weights(adapter_weights(root / "qlora-fsdp"), adapter_weights(root / "qlora-one"), atol=1e-5)
    assert eval_loss(root / "qlora-fsdp") == pytest.approx(eval_loss(root / "qlora-one"), rel=1e-5)


@pytest.mark.slow
def test_fsdp_dora_matches_one_process(setup):
    """DoRA's magnitude is a trainable vector per layer and its norm reads the whole (gathered) base weight."""
    model, data, root, _ = setup
    train(model, data, root / "dora-one", per_device_train_batch_size=4, train_type="dora")
    train(model, data, root / "dora-fsdp", 2, "--fsdp", per_device_train_batch_size=2, train_type="dora")
    dora = adapter_weights(root / "dora-fsdp")
    assert any("lora_magnitude_vector" in key for key in dora)
    assert_same_weights(dora, adapter_weights(root / "dora-one"), atol=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoint_saved_on_two_ranks_resumes_on_one(setup):
    model, data, root, _ = setup
    if not (root / "fsdp" / "checkpoint-3").is_dir():
        train(model, data, root / "fsdp", 2, "--fsdp", per_device_train_batch_size=2)
    done = train(model, data, root / "resumed", 1, "--fsdp", "full_shard auto_wrap", per_device_train_batch_size=4,
                 resume=str(root / "fsdp" / "checkpoint-3"))
    assert "resumed from" in done.stdout and "at step 3 of 7" in done.stdout
    assert_same_weights(adapter_weights(root / "resumed"), adapter_weights(root / "fsdp"), atol=1e-5)


@pytest.mark.slow
def test_fsdp_qlora_checkpoint_saved_on_one_rank_resumes_on_two(setup):
    """The 4-bit base's packed codes are frozen parameters under FSDP2 but are not checkpointed: a one-rank
    checkpoint reshards onto two, and the continuation equals the uninterrupted one-rank run."""
    model, data, root, _ = setup
    train(model, data, root / "qlora-fsdp-one", 1, "--fsdp", per_device_train_batch_size=4, train_type="qlora")
    done = train(model, data, root / "qlora-resumed", 2, "--fsdp", per_device_train_batch_size=2, train_type="qlora",
                 resume=str(root / "qlora-fsdp-one" / "checkpoint-3"))
    assert "resumed from" in done.stdout and "at step 3 of 7" in done.stdout
    assert_same_weights(adapter_weights(root / "qlora-resumed"), adapter_weights(root / "qlora-fsdp-one"), atol=1e-5)


@pytest.mark.slow
def test_fsdp_full_fine_tuning_with_gradient_checkpointing_trains(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model, data, root, _ = setup
    out = tmp_path / "full"
    train(model, data, out, 2, "--fsdp", per_device_train_batch_size=2, train_type="full", learning_rate=1e-3,
          gradient_checkpointing="true")
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["before_eval_loss"]
    base, tuned = AutoModelForCausalLM.from_pretrained(model), AutoModelForCausalLM.from_pretrained(out)
    assert base.state_dict().keys() == tuned.state_dict().keys()
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)


# --- FSDP2's loading: every rank builds the model empty and fills it block by block ------------------

# case -> (saved model, task, labels, --quantize, LoraConfig fields or None for full fine-tuning)
EMPTY_BUILDS = {
    "llama, NF4 base, DoRA": ("llama", "causal_lm", [], True, dict(use_dora=True)),
    "bert, new 2-label head": ("bert", "seq_cls", ["no", "yes"], False, dict(task_type="SEQ_CLS")),
    "gpt2, tied head, full": ("gpt2", "causal_lm", [], False, None),
    "qwen2_vl, NF4 language model": ("qwen2_vl", "causal_lm", [], True, {}),  # keys renamed as transformers loads
}


def _empty_build_source(folder, case: str) -> tuple:
    from helpers import save_tiny_bert_classifier, save_tiny_causal_lm, save_tiny_vlm

    arch, task, labels, quantize, _ = EMPTY_BUILDS[case]
    path = folder / arch
    if not path.exists():
        save = {"bert": save_tiny_bert_classifier, "qwen2_vl": lambda p: save_tiny_vlm(p, arch)}
        save.get(arch, lambda p: save_tiny_causal_lm(p, arch=arch))(path)
    return str(path), task, labels, torch.float32, quantize, ()


def _empty_build_prepare(case: str):
    from lorakit import LoraConfig, get_peft_model

    lora = EMPTY_BUILDS[case][4]
    if lora is None:
        return lambda base: base.float().requires_grad_(True)
    return lambda base: get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))


def _tied(model) -> bool:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = hf.get_output_embeddings()
    return head is not None and head.weight is hf.get_input_embeddings().weight


def _build_empty_on_two_ranks(rank: int, folder: str, case: str) -> None:
    """One of 2 gloo ranks: the model built empty and sharded block by block, each rank reading its shards from
    the checkpoint; each rank records the bytes it read (in all, and at most at once), and rank 1 writes what
    it holds."""
    import torch.distributed as dist

    from lorakit.io.empty_model import Weights, empty_model

    source = _empty_build_source(Path(folder), case)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        built = distributed.build(lambda: pytest.fail("the whole model was loaded"), lambda: empty_model(*source),
                                  _empty_build_prepare(case), distributed.Dist(rank, 2), sharded=True)
        reads, read = [], Weights.read

        def watched(weights, name, start=0, count=None):
            tensor = read(weights, name, start, count)
            reads.append(tensor.numel() * tensor.element_size())
            return tensor

        Weights.read = watched
        fsdp.shard(distributed.StepModule(built.model, None), built.model, torch.device("cpu"), 2, rank, False,
                   built.weights)
        model = built.model
        tensors = {name: p.full_tensor() for name, p in model.named_parameters(remove_duplicate=False)}
        if rank == 1:
            torch.save({"tensors": {**tensors, **dict(model.named_buffers())}, "read": sum(reads),
                        "at_once": max(reads), "tied": _tied(model), "note": built.note}, f"{folder}/rank1.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EMPTY_BUILDS))
def test_fsdp_builds_the_model_empty_on_every_rank_and_fills_it_as_one_process_loads_it(case, tmp_path):
    """No rank loads the whole model; a rank reads only its half of each dense tensor (a 4-bit weight whole, to
    quantise it); and the sharded model holds what one process loading it (and drawing the adapters' random
    numbers) holds."""
    from lorakit.io.pretrained import load_model
    from lorakit.io.weights import Checkpoint

    source = _empty_build_source(tmp_path, case)  # saved here, once: the ranks only read it
    torch.multiprocessing.spawn(_build_empty_on_two_ranks, args=(str(tmp_path), case), nprocs=2)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert "no rank holds the whole model" in rank1["note"]
    sizes = [end - start for _, entry, _ in Checkpoint(source[0]).entries.values()
             for start, end in [entry["data_offsets"]]]
    if EMPTY_BUILDS[case][3]:  # 4-bit: the quantised weights whole, the rest halved
        assert rank1["read"] < sum(sizes)
    else:
        assert rank1["read"] <= sum(sizes) / 2
    assert rank1["at_once"] <= max(sizes)
    torch.manual_seed(0)
    want = _empty_build_prepare(case)(load_model(*source))
    want_tensors = {**dict(want.named_parameters(remove_duplicate=False)), **dict(want.named_buffers())}
    assert rank1["tensors"].keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        assert torch.equal(rank1["tensors"][name], tensor), name
    assert rank1["tied"] == _tied(want)


def test_a_tied_head_trained_as_a_module_to_save_fills_from_the_embedding(tmp_path, monkeypatch):
    """GPT-2's checkpoint holds its tied head once, as the input embedding; the head's trainable copy reads it,
    in bf16 as the frozen base loads, then in fp32 as the trainer casts what it trains (--fsdp on one process)."""
    from helpers import save_tiny_causal_lm
    from lorakit.io.empty_model import empty_model
    from lorakit.io.pretrained import load_model
    from lorakit.train.args import TrainArgs
    from lorakit.train.model import prepare_model

    source = (save_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2"), "causal_lm", [], torch.bfloat16, False, ())
    args = TrainArgs(lora_rank=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ctx = distributed.setup(sharded=True)
    try:
        torch.manual_seed(0)
        built = distributed.build(lambda: pytest.fail("loaded whole"), lambda: empty_model(*source),
                                  lambda base: prepare_model(base, args, "causal_lm"), ctx, sharded=True)
        distributed.wrap(built, None, ctx, sharded=True, bf16=False)
        got = {name: p.full_tensor() for name, p in built.model.named_parameters()}
        copy = built.model.get_base_model().lm_head.modules_to_save["default"].weight
        assert copy is not built.model.get_base_model().transformer.wte.weight
    finally:
        distributed.teardown(ctx)
    torch.manual_seed(0)
    want = prepare_model(load_model(*source), args, "causal_lm")
    assert got.keys() == dict(want.named_parameters()).keys()
    for name, expected in want.named_parameters():
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name
    assert got["base_model.model.lm_head.modules_to_save.default.weight"].dtype == torch.float32


def test_a_model_that_cannot_be_built_empty_says_why(tmp_path):
    from lorakit.io.empty_model import NotStreamable, empty_model

    with pytest.raises(NotStreamable, match="not a local folder"):
        empty_model("someone/some-model", "causal_lm", [], torch.float32)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotStreamable, match="no model.safetensors"):
        empty_model(str(tmp_path), "causal_lm", [], torch.float32)


# --- FSDP2's loading where the model cannot be built empty: rank 0 loads, the others get their shards -------



def _load_on_rank_0(rank: int, folder: str) -> None:
    """One of 2 gloo ranks: a 4-bit Llama with DoRA built on rank 0 and sharded; rank 1 writes what it holds."""
    import torch.distributed as dist

    from helpers import quantized_llama
    from lorakit import LoraConfig, get_peft_model

    devices = set()

    def load():
        assert rank == 0, "a rank other than 0 loaded the model"
        return quantized_llama()[0]

    def prepare(base):
        devices.update(t.device.type for t in [*base.parameters(), *base.buffers()])
        torch.manual_seed(0)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        model = fsdp.built_on_main(load, prepare, rank)
        fsdp.shard(distributed.StepModule(model, None), model, torch.device("cpu"), 2, rank, bf16=False)
        held = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 1:
            torch.save({"devices": sorted(devices), "tensors": {**held, **dict(model.named_buffers())}},
                       f"{folder}/rank1.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_other_ranks_never_load_and_get_rank_0s_weights(tmp_path):
    from helpers import quantized_llama
    from lorakit import LoraConfig, get_peft_model

    torch.multiprocessing.spawn(_load_on_rank_0, args=(str(tmp_path),), nprocs=2)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank1["devices"] == ["meta"]  # what rank 1 prepared: rank 0's structure, no weights
    base = quantized_llama()[0]
    torch.manual_seed(0)
    want = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    want = {**dict(want.named_parameters()), **dict(want.named_buffers())}
    assert rank1["tensors"].keys() == want.keys()
    assert any(name.endswith("weight_packed") for name in want) and any("magnitude" in name for name in want)
    for name, tensor in want.items():
        assert torch.equal(rank1["tensors"][name], tensor), name


def test_nf4_storage_as_parameters_keeps_the_keys_and_the_output():
    """What FSDP2 shards of a 4-bit layer: its uint8 codes and block scales, now frozen parameters."""
    from helpers import LM_IDS, quantized_llama

    model = quantized_llama()[0]
    keys, before = model.state_dict().keys(), model(LM_IDS).logits
    for layer in fsdp.nf4_layers(model):
        layer.storage_as_parameters()
    stored = {n: p for n, p in model.named_parameters() if n.endswith(("weight_packed", "weight_absmax"))}
    assert len(stored) == 2 * len(fsdp.nf4_layers(model)) == 28
    assert all(p.dtype == torch.uint8 and not p.requires_grad for p in stored.values())
    assert model.state_dict().keys() == keys
    assert torch.equal(model(LM_IDS).logits, before)


def test_a_models_skeleton_keeps_its_structure_and_ties_but_no_data():
    import pickle

    from helpers import quantized_llama

    model = quantized_llama()[0]
    model.lm_head.weight = model.model.embed_tokens.weight
    copy, state = pickle.loads(fsdp.skeleton(model)), model.state_dict()
    assert copy.state_dict().keys() == state.keys()
    assert all(t.is_meta and (t.shape, t.dtype) == (state[k].shape, state[k].dtype)
               for k, t in copy.state_dict().items())
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert copy.model.layers[0].mlp.up_proj.offset == model.model.layers[0].mlp.up_proj.offset


def test_a_model_that_does_not_pickle_is_refused_under_fsdp():
    model = torch.nn.Linear(2, 2)
    model.register_forward_hook(lambda *_: None)
    with pytest.raises(TypeError, match=r"does not pickle .*without --fsdp"):
        fsdp.skeleton(model)


# --- bad setups, each refused with what would work -------------------------------------------------


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"more processes per node than the 1 visible GPU"):
        distributed.setup()


def test_fsdp_refuses_a_model_without_known_blocks():
    with pytest.raises(ValueError, match=r"names no block class.*without --fsdp"):
        fsdp.transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))


def test_fsdp_finds_the_decoder_blocks(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert fsdp.transformer_blocks(model) == list(model.model.layers)


@pytest.mark.parametrize("flags, value", [([], None), (["--fsdp"], "full_shard"),
                                          (["--fsdp", "full_shard"], "full_shard"),
                                          (["--fsdp", "full_shard auto_wrap"], "full_shard"),
                                          (["--fsdp", "false"], None)])
def test_fsdp_spellings(flags, value):
    assert parse_train_args(flags).fsdp == value


def test_fsdp_options_lorakit_lacks_are_refused():
    with pytest.raises(ValueError, match="hybrid_shard and offload are not implemented"):
        parse_train_args(["--fsdp", "hybrid_shard"])


def trajectory(per_device: int, processes: int, accumulation: int = 1) -> dict:
    return {"per_device_train_batch_size": per_device, "processes": processes,
            "gradient_accumulation_steps": accumulation, "global_batch_size": per_device * processes * accumulation}


def test_resume_on_another_process_count_keeps_the_global_batch(tmp_path):
    check_same_trajectory(trajectory(2, 2), trajectory(4, 1), tmp_path)  # 2 x 2 -> 4 x 1: the same steps
    check_same_trajectory(trajectory(1, 2, 2), trajectory(2, 2), tmp_path)
    with pytest.raises(ValueError, match=r"global batch: 4 in the checkpoint .* 6 now .*cannot be split over 3 "
                                         r"processes; use a process count that divides 4"):
        check_same_trajectory(trajectory(2, 2), trajectory(2, 3), tmp_path)
    with pytest.raises(ValueError, match=r"with 1 processes, give --per_device_train_batch_size x "
                                         r"--gradient_accumulation_steps = 4"):
        check_same_trajectory(trajectory(2, 2), trajectory(2, 1), tmp_path)
