"""The config schema: layering, path resolution, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexgen.config import FlexGenConfig, load_config, to_yaml
from flexgen.errors import ConfigError
from flexgen.policy import Policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = ["model.synthetic=opt-125m", "data.num_prompts=2", "data.prompt_len=4"]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_design_contract():
    cfg = load_config(None, MINIMAL)
    assert isinstance(cfg, FlexGenConfig)
    assert cfg.to_policy() == Policy()
    assert cfg.plugins_dict() == {
        "storage": {"gpu": "gpu", "cpu": "cpu", "disk": "disk"}, "attention": "gpu",
        "weight_compressor": "none", "cache_compressor": "none", "scheduler": "zigzag",
    }
    assert cfg.generation_kwargs() == {
        "max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "repetition_penalty": 1.0, "stop": None, "stop_strings": None, "seed": 0,
    }
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy, cfg.trainer.num_nodes) == ("auto", 1, "auto", 1)
    assert cfg.output.path == "outputs/predictions.jsonl"
    assert cfg.hardware.profile is None and cfg.hardware_caps() == {}


def test_several_processes_and_hardware_caps_are_accepted():
    cfg = load_config(None, MINIMAL + ["trainer.devices=4", "trainer.num_nodes=2", "trainer.strategy=ddp",
                                       "hardware.gpu_memory=24GiB", "hardware.disk_memory=500GB"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (4, 2, "ddp")
    assert cfg.hardware_caps() == {"gpu_memory": "24GiB", "disk_memory": "500GB"}
    assert list(load_config(None, MINIMAL + ["trainer.devices=[0,2]"]).trainer.devices) == [0, 2]
    assert load_config(None, MINIMAL + ["trainer.devices=-1"]).trainer.devices == -1


def test_overrides_win_over_file_and_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", """
model: {path: ckpt, dtype: float32}
policy: {gpu_batch_size: 2, weights_gpu: 30, weights_cpu: 50}
plugins: {attention: {name: cpu, threads: 2}}
data: {prompts: p.jsonl}
output: {path: out/o.jsonl}
""")
    cfg = load_config(path, ["policy.gpu_batch_size=8", "generation.stop=[2,3]"])
    assert cfg.policy.gpu_batch_size == 8 and cfg.to_policy().weights_cpu == 50
    assert cfg.plugins_dict()["attention"] == {"name": "cpu", "threads": 2}
    assert cfg.generation_kwargs()["stop"] == [2, 3]
    mixed = load_config(path, ["generation.stop=[2, '###', 3]"]).generation_kwargs()
    assert (mixed["stop"], mixed["stop_strings"]) == ([2, 3], ["###"])
    # inputs written in the file: relative to the file's folder; outputs: relative to cwd
    assert cfg.model.path == str(tmp_path / "sub" / "ckpt")
    assert cfg.data.prompts == str(tmp_path / "sub" / "p.jsonl")
    assert cfg.output.path == "out/o.jsonl"
    # the same keys from the command line stay relative to cwd
    cfg = load_config(path, ["data.prompts=q.txt"])
    assert cfg.data.prompts == "q.txt"


def test_builtin_model_path_is_not_a_file_path(tmp_path):
    cfg = load_config(write(tmp_path, "model: {path: 'builtin:quickstart'}\ndata: {num_prompts: 1, prompt_len: 2}\n"))
    assert cfg.model.path == "builtin:quickstart"


def test_policy_auto(tmp_path):
    cfg = load_config(None, MINIMAL + ["policy=auto"])
    assert cfg.policy.auto
    cfg = load_config(write(tmp_path, "policy: auto\n"), MINIMAL)
    assert cfg.policy.auto and "policy: auto" in to_yaml(cfg)
    # a mapping given later switches auto off again only when it says so
    assert not load_config(write(tmp_path, "policy: auto\n"), MINIMAL + ["policy.auto=false"]).policy.auto
    message = error_of(write(tmp_path, "policy: auto\n"), MINIMAL + ["policy.gpu_batch_size=3"])
    assert "policy.gpu_batch_size" in message and "auto" in message
    assert "'auto'" in error_of(None, MINIMAL + ["policy=fast"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("polcy.gpu_batch_size=2", "did you mean 'policy'"),
        ("policy.gpu_batchsize=2", "did you mean 'policy.gpu_batch_size'"),
        ("generation.max_new_token=3", "did you mean 'generation.max_new_tokens'"),
        ("plugins.atention=cpu", "did you mean 'plugins.attention'"),
        ("plugins.storage.gpy=gpu", "did you mean 'plugins.storage.gpu'"),
        ("trainer.num_node=2", "did you mean 'trainer.num_nodes'"),
    ],
)
def test_unknown_key_suggests_close_match(override, expected):
    message = error_of(None, MINIMAL + [override])
    assert "unknown" in message and expected in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("policy.gpu_batch_size=abc", "policy.gpu_batch_size"),
        ("policy.gpu_batch_size=2.5", "policy.gpu_batch_size"),
        ("policy.gpu_batch_size=0", "policy.gpu_batch_size"),
        ("policy.weights_gpu=120", "policy.weights_gpu"),
        ("policy.cache_cpu=-1", "policy.cache_cpu"),
        ("policy.overlap=maybe", "policy.overlap"),
        ("generation.max_new_tokens=0", "generation.max_new_tokens"),
        ("generation.top_p=1.5", "generation.top_p"),
        ("generation.temperature=0", "generation.temperature"),
        ("generation.stop=[-1]", "generation.stop"),
        ("generation.stop=[[2]]", "generation.stop"),
        ("generation.stop=[2, '']", "generation.stop"),
        ("generation.top_k=-1", "generation.top_k"),
        ("output.order=file", "output.order"),
        ("generation.repetition_penalty=0", "generation.repetition_penalty"),
        ("model.dtype=fp8", "model.dtype"),
        ("model.synthetic=opt-13", "model.synthetic"),
        ("data.num_prompts=0", "data.num_prompts"),
        ("trainer.accelerator=tpu", "trainer.accelerator"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.devices=[]", "trainer.devices"),
        ("hardware.gpu_memory=lots", "hardware.gpu_memory"),
        ("hardware.disk_memory=0GB", "hardware.disk_memory"),
        ("hardware.profile=no-such-preset", "hardware.profile"),
        ("plugins.attention=[1]", "plugins.attention"),
        ("policy=3", "policy"),
    ],
)
def test_wrong_type_or_range_names_the_key(override, key):
    assert key in error_of(None, MINIMAL + [override])


def test_weights_over_100_percent():
    message = error_of(None, MINIMAL + ["policy.weights_gpu=60", "policy.weights_cpu=60"])
    assert "policy.weights_gpu + policy.weights_cpu" in message


def test_model_and_data_must_be_given():
    assert "model.path" in error_of(None, ["data.num_prompts=1", "data.prompt_len=1"])
    assert "model.path" in error_of(None, MINIMAL + ["model.path=x"])
    assert "data.prompts" in error_of(None, ["model.synthetic=opt-125m"])


def test_file_errors(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml") and "nope.yaml" in error_of(tmp_path / "nope.yaml")
    message = error_of(write(tmp_path, "model:\n  path: [unclosed\n"))
    assert "c.yaml" in message and "line" in message
    assert "mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    message = error_of(write(tmp_path, "model: {synthetic: opt-125m}\ndata: {num_prompts: 1, prompt_len: 2}\nmodle: {}\n"))
    assert "did you mean 'model'" in message and "c.yaml" in message
    assert "key=value" in error_of(None, MINIMAL + ["justakey"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_configs_load_and_validate(path):
    cfg = load_config(path)
    if not cfg.policy.auto:
        assert cfg.to_policy().block_size >= 1
    # every plugin they name is registered
    from flexgen import registry

    kinds = {"attention": "attention", "weight_compressor": "compressor", "cache_compressor": "compressor",
             "scheduler": "scheduler"}
    for key, kind in kinds.items():
        name, _ = registry.parse_spec(cfg.plugins_dict()[key], f"plugins.{key}")
        assert name in registry.available(kind), (key, name)


def test_interpolations_and_hub_tokenizer_names(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXGEN_TEST_MODELS", str(tmp_path / "models"))
    path = write(tmp_path, "model: {path: '${oc.env:FLEXGEN_TEST_MODELS}/opt', tokenizer: facebook/opt-125m}\n"
                           "data: {prompts: p.jsonl}\n")
    cfg = load_config(path)
    assert cfg.model.path == str(tmp_path / "models" / "opt")
    assert cfg.model.tokenizer == "facebook/opt-125m"  # no such folder beside the config: a Hub name
    assert "data.prompts" in error_of(write(tmp_path, "model: {synthetic: opt-125m}\ndata: {prompts: '${nope}'}\n"))
