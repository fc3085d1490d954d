"""Record each shipped SmolLM2 adapter's score on the first few test examples of its task (CPU, float32).

    python benchmarks/quality/record_slices.py            # writes results/slice_scores.json

tests/e2e/test_shipped_adapters.py scores the same slices and must find the same numbers: the adapters, the
task files and the scoring code have not drifted from what the benchmark's tables were made with.
"""

from __future__ import annotations

import json
from pathlib import Path

from iteris.assets import smollm2_dir
from iteris.evaluate import evaluate

HERE = Path(__file__).resolve().parent
SLICE = 8
OUT = HERE / "results" / "slice_scores.json"


def slice_config(tasks: list[str]) -> dict:
    return {
        "base_model": str(smollm2_dir()),
        "tasks": [
            {"name": t, "data": str(HERE / "data" / t / "test.jsonl"), "adapter": str(HERE / "adapters" / "smollm2" / t),
             "metric": json.loads((HERE / "data" / t / "task.json").read_text())["metric"], "limit": SLICE}
            for t in tasks
        ],
        "device": "cpu", "dtype": "float32", "batch_size": 8, "include_base": False, "progress": False,
    }


def main() -> None:
    tasks = sorted(p.name for p in (HERE / "adapters" / "smollm2").iterdir() if p.is_dir())
    results = evaluate(slice_config(tasks))
    scores = next(r for r in results["rows"] if r["method"] == "individual")["scores"]
    OUT.write_text(json.dumps({"examples_per_task": SLICE, "device": "cpu", "dtype": "float32",
                               "metrics": results["metrics"], "individual": scores}, indent=2) + "\n")
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
