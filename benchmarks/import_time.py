"""Wall time of `import lorakit` vs `import peft` in fresh interpreters, interleaved, alternating order.

    python benchmarks/import_time.py [rounds]
"""
import statistics
import subprocess
import sys
import time


def import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True)
    return time.perf_counter() - start


def main(rounds: int) -> None:
    baseline = statistics.median(import_seconds("sys") for _ in range(3))
    times: dict[str, list[float]] = {"torch": [], "lorakit": [], "peft": []}
    for i in range(rounds):
        order = list(times) if i % 2 == 0 else list(reversed(times))
        for module in order:
            times[module].append(import_seconds(module) - baseline)
    medians = {m: statistics.median(t) for m, t in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["lorakit"], times["peft"]))
    print(f"interpreter start-up subtracted: {baseline:.3f}s; {rounds} rounds, median seconds")
    print("   ".join(f"import {m}: {s:.2f}s" for m, s in medians.items()))
    print(f"median per-round ratio lorakit/peft: {ratio:.3f}")
    heavy = subprocess.run([sys.executable, "-c", "import sys, lorakit; print(sorted(m for m in "
                            "('transformers', 'peft', 'datasets') if m in sys.modules))"],
                           check=True, capture_output=True, text=True).stdout.strip()
    print(f"heavy modules loaded by `import lorakit`: {heavy}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
