"""``flexgen plan`` / ``flexgen predict --dry-run``: the plan of a run, without running it, and
``--print-config`` showing what ``policy: auto`` resolves to."""

from __future__ import annotations

import json

from flexgen import Policy, load_engine
from flexgen.cli import main as cli_main
from flexgen.config import load_config
from flexgen.predict.plan import make_plan
from flexgen.policy import TIERS
from tests.cli_driver import fingerprint
from tests.test_predict_e2e import QUICKSTART

PRESET = "hardware.profile=t4-paper"  # a fixed machine: no measurement, the same figures everywhere


def test_weight_placement_is_the_engines(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    policy = ["policy.weights_gpu=30", "policy.weights_cpu=40", "policy.cache_gpu=50", "policy.cache_cpu=50",
              "policy.num_gpu_batches=3"]
    cfg = load_config(None, [f"model.path={path}", "model.dtype=float32", "data.num_prompts=5", "data.prompt_len=6",
                             "plugins.weight_compressor=int4", PRESET, f"output.offload_dir={tmp_path}", *policy])
    view = make_plan(cfg)
    assert len(view.weights) == view.weights[-1]["layer"] + 1
    with load_engine(path, policy=cfg.to_policy(), plugins={"weight_compressor": "int4"}, device="cpu",
                     dtype="float32", offload_dir=tmp_path) as engine:
        for row, placed in zip(view.weights, engine.layers, strict=True):
            assert row["tensors"] == {t: sum(p.tier == t for p in placed) for t in TIERS}
            assert row["bytes"] == {t: sum(x.numel() * x.element_size() for p in placed if p.tier == t
                                           for x in p.parts.values()) for t in TIERS}
    assert all(view.weight_totals()[t] > 0 for t in TIERS), "the policy should use every tier, or this checks less"
    # cache and activations per GPU batch, every decoder layer's cache somewhere
    assert [sum(row["layers"].values()) for row in view.cache] == [engine.spec.num_layers] * 3
    assert {row["tier"] for row in view.activations} == {"gpu"}
    assert view.predicted["peak_memory"]["gpu"] > 0 and view.predicted["predicted_throughput"] > 0


def test_plan_auto_resolved_and_dry_run_write_nothing(quickstart_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FLEXGEN_CACHE", str(quickstart_cache))
    monkeypatch.chdir(tmp_path)
    before = fingerprint(tmp_path)
    assert cli_main(["plan", "--config", str(QUICKSTART), "policy=auto", PRESET, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["policy_source"] == "auto" and plan["predicted"]["predicted_throughput"] > 0
    assert plan["does_not_fit"] == [] and plan["hardware"]["name"] == "t4-paper"
    assert cli_main(["plan", "--config", str(QUICKSTART), "policy=auto", PRESET]) == 0
    text = capsys.readouterr().out
    assert "policy (auto): block" in text and "predicted throughput:" in text and "weights (bytes per tier):" in text
    assert cli_main(["predict", "--dry-run", "--config", str(QUICKSTART), "policy=auto", PRESET]) == 0
    assert capsys.readouterr().out == text
    assert fingerprint(tmp_path) == before and not (tmp_path / "outputs").exists()


def test_print_config_shows_the_resolved_auto_policy(quickstart_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FLEXGEN_CACHE", str(quickstart_cache))
    assert cli_main(["predict", "--print-config", "--config", str(QUICKSTART), "policy=auto", PRESET]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# policy: auto, resolved by the cost model for t4-paper")
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)  # a config that runs that very policy
    resolved = load_config(saved)
    plan = make_plan(load_config(QUICKSTART, ["policy=auto", PRESET]))
    assert not resolved.policy.auto and resolved.to_policy() == plan.policy
    assert isinstance(resolved.to_policy(), Policy)
