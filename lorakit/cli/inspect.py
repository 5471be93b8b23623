"""`lorakit inspect`: what an adapter is and does: method, ranks, targets, norms, spectra; loud about no-ops."""
from __future__ import annotations

import argparse
import json
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit inspect", description=(
        "Describe an adapter: method (LoRA / DoRA / rsLoRA), rank, alpha and scaling per module, the norm, "
        "singular values and effective rank of each update, parameters and bytes. With --model: whether each "
        "module exists in the base with the right shape, and the update's size next to the frozen weight. "
        "Exit code 1 when the adapter changes nothing (a no-op)."))
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (PEFT format)")
    p.add_argument("--model", help="base model folder, to check the adapter against")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="PNG", help="write a plot of each module's singular values here")
    return p


def run(argv: list[str]) -> int:
    from lorakit.tools.inspect import inspect_adapter

    args = parser().parse_args(argv)
    report = inspect_adapter(args.adapter, args.model)
    if args.plot:
        plot_spectra(report, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    for warning in report["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 1 if report["no_op"] else 0


def print_report(report: dict) -> None:
    print(f"{report['adapter']}: {report['method']}, r={report['r']}, lora_alpha={report['lora_alpha']}, "
          f"base {report['base_model']}")
    print(f"target_modules: {report['target_modules']}; modules_to_save: {report['modules_to_save']}; "
          f"bias: {report['bias']}")
    print(f"{report['parameters']:,d} parameters, {report['bytes']:,d} bytes")
    modules = report["modules"]
    width = max(len(p) for p in modules)
    print(f"{'module':<{width}}  rank  alpha   scaling  ||dW||_F  /||W||_F  eff.rank  top singular values")
    for path, m in modules.items():
        relative = m.get("relative_update")
        top = ", ".join(f"{s:.3g}" for s in m["singular_values"][:4])
        print(f"{path:<{width}}  {m['rank']:>4}  {m['alpha']:>5g}  {m['scaling']:>8.4g}  {m['update_norm']:>8.4g}  "
              f"{'' if relative is None else f'{relative:.3g}':>8}  {m['effective_rank']:>8.2f}  {top}")
    print(f"effective rank: {report['effective_rank_definition']}")


def plot_spectra(report: dict, path: str) -> None:
    """A PNG of every module's singular values (log scale), one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.io.files import atomic_write

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in report["modules"].items():
        values = [s for s in m["singular_values"] if s > 0]
        if values:
            ax.plot(range(1, len(values) + 1), values, marker=".", linewidth=1, label=name)
    ax.set(yscale="log", xlabel="index", ylabel="singular value of s·B·A",
           title=f"{report['adapter']} ({report['method']})")
    if len(report["modules"]) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
