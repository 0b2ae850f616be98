"""What ``flexgen predict`` says while it works: loading and converting before the first block,
a progress bar counting prompts and tokens, all on stderr; stdout holds the summary alone."""

from __future__ import annotations

import json

from flexgen.cli import main as cli_main
from flexgen.predict import callbacks
from tests.test_predict_e2e import QUICKSTART


def test_feedback_goes_to_stderr_and_the_summary_alone_to_stdout(quickstart_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FLEXGEN_CACHE", str(quickstart_cache))
    monkeypatch.setattr(callbacks, "LOADING_BAR_DELAY_S", 0)  # the bar a long conversion shows, at once
    offload = tmp_path / "offload"
    args = ["predict", "--config", str(QUICKSTART), f"output.path={tmp_path / 'out.jsonl'}", "generation.max_new_tokens=4",
            "policy.weights_gpu=0", "policy.weights_cpu=0", f"output.offload_dir={offload}"]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("flexgen predict: 12 prompts generated") and "throughput:" in out
    assert "generating" not in out and "tok/s=" not in out, "the progress bar belongs on stderr"
    assert "flexgen: loading" in err and "weight tensors" in err and "on the disk tier" in err
    assert f"offload folder {offload}" in err
    assert "converted" in err and "tensors into" in err
    assert "placing weights:" in err and "layer/s" in err, "the loading progress bar"
    assert "12 prompts to generate (0 already done) in 3 blocks of up to 4" in err
    bar = err.replace("\r", "\n")
    assert "12/12" in bar and "tokens=" in bar and "tok/s=" in bar

    # again from scratch: the converted tensors are reused, and it says so
    assert cli_main(args + ["--restart"]) == 0
    out, err = capsys.readouterr()
    assert "reused the" in err and f"converted tensors in {offload}" in err
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {line["finish_reason"] for line in lines} <= {"stop", "length"} and len(lines) == 12
