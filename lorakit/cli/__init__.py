"""The `lorakit` command: one verb per job."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

VERBS = {
    "train": "fine-tune with LoRA / DoRA / full (no arguments: a MiniLM demo that runs offline)",
    "infer": "generate or classify with a trained adapter",
    "serve": "OpenAI-compatible HTTP server: one base model, many adapters, batched",
    "plan": "will a model and recipe fit in GPU memory? a breakdown and the changes that make it fit",
    "merge": "write base + adapter(s) as one plain model folder",
    "resize": "change an adapter's rank (truncated SVD of each update)",
    "extract": "a LoRA adapter from a fully fine-tuned model and its base",
    "inspect": "what an adapter is and does: ranks, targets, norms, spectra",
}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError, ImportError)
# The modules each verb imports, and the extra that installs them (tensorboard is optional).
NEEDS = {"train": (("transformers", "datasets", "yaml", "tqdm", "matplotlib"), "train"),
         "infer": (("transformers", "datasets", "yaml"), "train"),
         "serve": (("transformers", "fastapi", "uvicorn", "prometheus_client"), "serve"),
         "plan": ((), "train"),
         "merge": (("transformers", "tqdm"), "train"),
         "resize": (("tqdm",), "train"),
         "extract": (("transformers", "tqdm"), "train"),
         "inspect": ((), "train")}


def require_extra(verb: str) -> None:
    """Fail at once, naming the install command, when a package the verb needs is missing."""
    modules, extra = NEEDS[verb]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"lorakit {verb} needs {', '.join(missing)}, not installed: "
                          f'pip install "lorakit[{extra}]"')


def _train(argv: list[str]) -> int:
    from lorakit.train.args import parse_train_args
    from lorakit.train.loop import TrainingDiverged, train

    args = parse_train_args(argv)
    try:
        train(args)
    except TrainingDiverged as err:
        print(f"lorakit train: stopped: {err}", file=sys.stderr)
        return 1
    return 0


def _infer(argv: list[str]) -> int:
    from lorakit.cli.infer import parse_infer_args, run_infer

    run_infer(parse_infer_args(argv))
    return 0


def _serve(argv: list[str]) -> int:
    from lorakit.serve.server import parse_serve_args, run_server

    run_server(parse_serve_args(argv))
    return 0


def _tool(verb: str):
    """A verb with a module of its own, lorakit/cli/<verb>.py, whose run(argv) returns the exit code."""
    def run(argv: list[str]) -> int:
        return importlib.import_module(f"lorakit.cli.{verb}").run(argv)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="LoRA fine-tuning and inference.",
        epilog="\n".join(f"  {verb:<8} {text}" for verb, text in VERBS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("verb", choices=VERBS, help="what to do; `lorakit VERB --help` for its flags")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        require_extra(ns.verb)
        verbs = {"train": _train, "infer": _infer, "serve": _serve}
        return verbs.get(ns.verb, _tool(ns.verb))(ns.flags)
    except USER_ERRORS as err:
        print(f"lorakit {ns.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {ns.verb}: interrupted", file=sys.stderr)
        return 130
