"""`iteris demo` end to end on the model it builds: a table, an adapter PEFT loads, results.json."""

import json

from iteris.cli import main


def test_demo_writes_results_and_an_adapter(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "iteris" in printed and "task_arithmetic" in printed
    results = json.loads((out / "results.json").read_text())
    lost = results["effect_lost"]
    assert lost["base model"] == {"sports": 1.0, "cooking": 1.0, "finance": 1.0}
    mean = {m: sum(v.values()) / len(v) for m, v in lost.items()}
    # the data-aware merges keep more of every adapter's effect than a plain sum does
    assert mean["iteris"] < mean["task_arithmetic"] and mean["regmean"] < mean["task_arithmetic"]
    assert (out / "iteris" / "adapter_model.safetensors").is_file()
