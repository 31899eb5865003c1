"""The config is validated before any process group exists, and every rejection is one line naming the key."""

import pytest
import yaml

from megatron_gopd.config import ConfigError, load_config
from megatron_gopd.preflight import check_run
from tests.conftest import ROOT
from tests.runs import minimal_config, write_run


def load(path, overrides=(), world_size=2):
    """What `python -m megatron_gopd.train` checks before any process group: the config, then the run."""
    config = load_config(path, list(overrides))
    check_run(config, world_size)
    return config


def teachers(ckpts, **math):
    return [dict({"name": "math", "path": str(ckpts / "math"), "domains": ["math"]}, **math),
            {"name": "code", "path": str(ckpts / "code"), "domains": ["code"]}]


@pytest.mark.parametrize("override, key", [
    ("algo.lam=0", "algo.lam"),
    ("algo.lamda=1.25", "algo.lamda"),
    ("student.path=/nonexistent", "student.path"),
    ("student.parallel.tp=3", "student.parallel"),
    ("data.train=[/nonexistent.jsonl]", "data.train"),
    ("optim.warmup_steps=1000", "optim.warmup_steps"),
    ("algo.name=ppo", "algo.name"),
    ("algo.aggregation=mean", "algo.aggregation"),
    ("rollout.engine=vllm", "rollout.engine"),
    ("data.on_bad_row=ignore", "data.on_bad_row"),
    ("student.dtype=fp16", "student.dtype"),
    ("rollout.temperature=0", "rollout.temperature"),  # greedy: no log-probs to train on
    ("train.pack_sequences=true", "train.pack_sequences"),  # with student.attention=megatron below
    ("data.prompts_per_step=3", "data.prompts_per_step"),  # nor over 2 data-parallel replicas (world 2)
    ("data.default_teacher=poetry", "data.default_teacher"),
    ("algo.loss=kl", "algo.loss"),
])
def test_bad_values_are_rejected_naming_the_key(override, key, tiny_checkpoints, tmp_path):
    extra = ["student.attention=megatron"] if key == "train.pack_sequences" else []
    with pytest.raises(ConfigError) as error:
        load(write_run(tmp_path, tiny_checkpoints), [override, *extra])
    assert str(error.value).startswith(f"{key}: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("change, message", [
    ({"teachers": "twice"}, "teachers[1].domains: domain 'math' is claimed by both 'math' and 'code'"),
    ({"teachers": "reserved"}, "teachers: 'reference' is reserved for the reference model"),
    ({"teachers": "no_domain"}, "teachers[0].domains: teacher 'math' claims no domain and is not data.default_teacher"),
    ({"teachers": "sglang_no_url"}, "teachers[0].url: placement sglang needs the server's url"),
    ({"teachers": "sglang_temperature"}, "rollout.temperature: teachers[0] is an sglang server, which scores at "
                                         "temperature 1; set rollout.temperature=1.0"),
    ({"teachers": "unknown_placement"}, "teachers[0].placement: 'remote' is not one of "
                                        "['colocated', 'dedicated', 'sglang']"),
    ({"algo": {"name": "grpo", "loss": "full_vocab"}}, "algo.loss: full_vocab is a G-OPD loss"),
    ({"algo": {"lam": 1.25, "loss": "full_vocab"}, "student_pp": 2}, "algo.loss: full_vocab needs student.parallel.pp == 1"),
    ({"algo": {"lam": 1.25, "loss": "full_vocab"}, "teachers": "dedicated"},
     "teachers[0].placement: algo.loss=full_vocab needs colocated models"),
    ({"algo": {"lam": 1.25}, "teachers": "none"}, "teachers: G-OPD needs at least one teacher"),
])
def test_cross_field_rules_name_the_key(change, message, tiny_checkpoints, tmp_path):
    sections = {
        "twice": teachers(tiny_checkpoints)[:1] + [dict(teachers(tiny_checkpoints)[1], domains=["code", "math"])],
        "reserved": teachers(tiny_checkpoints, name="reference"),
        "no_domain": teachers(tiny_checkpoints, domains=[]),
        "sglang_no_url": teachers(tiny_checkpoints, placement="sglang", path=str(tiny_checkpoints / "hf" / "math")),
        "sglang_temperature": teachers(tiny_checkpoints, placement="sglang", url="http://127.0.0.1:1",
                                       path=str(tiny_checkpoints / "hf" / "math")),
        "unknown_placement": teachers(tiny_checkpoints, placement="remote"),
        "dedicated": teachers(tiny_checkpoints, placement="dedicated"),
        "none": [],
    }
    overrides = {}
    if "teachers" in change:
        overrides["teachers"] = sections[change["teachers"]]
    if "algo" in change:
        overrides["algo"] = change["algo"]
    if change.get("student_pp"):
        overrides["student"] = {"path": str(tiny_checkpoints / "student"), "parallel": {"pp": 2}}
    path = write_run(tmp_path, tiny_checkpoints, **overrides)
    args = ["rollout.temperature=0.7"] if change.get("teachers") == "sglang_temperature" else []
    with pytest.raises(ConfigError) as error:
        load(path, args, world_size=None)
    assert str(error.value) == message


def test_a_valid_config_round_trips_through_its_resolved_yaml(tiny_checkpoints, tmp_path):
    from megatron_gopd.config import save_resolved

    config = load(write_run(tmp_path, tiny_checkpoints), ["algo.lam=1.5"])
    save_resolved(config, tmp_path / "resolved.yaml")
    again = load(tmp_path / "resolved.yaml")
    assert again == config and yaml.safe_load((tmp_path / "resolved.yaml").read_text())["algo"]["lam"] == 1.5


def test_list_entries_are_overridden_by_index(tiny_checkpoints, tmp_path):
    path = write_run(tmp_path, tiny_checkpoints)
    config = load(path, ["teachers.0.placement=dedicated", "teachers.1.dtype=bf16", "teachers.0.parallel.tp=2"],
                  world_size=4)
    assert (config.teachers[0].placement, config.teachers[0].parallel.tp, config.teachers[1].dtype) == (
        "dedicated", 2, "bf16")
    assert config.teachers[1].placement == "colocated" and config.teachers[0].dtype == "fp32"  # the rest as given
    for override, message in [
            ("teachers.2.dtype=bf16", "teachers.2: index 2 is out of range (teachers has 2 entries)"),
            ("teachers.x.dtype=bf16", "teachers.x: teachers is a list; index it by number"),
            ("teachers.0.colour=red", "teachers[0].colour: unknown config key; known keys:"),
            ("algo.lam.x=1", "algo.lam.x: algo.lam is a value, not a section")]:
        with pytest.raises(ConfigError) as error:
            load(path, [override])
        assert str(error.value).startswith(message), (override, str(error.value))


def test_an_output_dir_that_takes_no_files_or_has_no_room_fails_at_start(tiny_checkpoints, tmp_path, monkeypatch):
    """Before any step, not at the first checkpoint: a directory that cannot be created or written (here under a
    file; a read-only filesystem fails the same write), and one whose free space cannot hold the checkpoints."""
    import shutil
    from collections import namedtuple

    path = write_run(tmp_path, tiny_checkpoints)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"^train.output_dir: cannot write to .*a-file/run: \[Errno 20\]"):
        load(path, [f"train.output_dir={tmp_path / 'a-file' / 'run'}"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 4096, 4096))
    with pytest.raises(ConfigError, match=r"^train.output_dir: .* has 0.00 GiB free, but 2 kept checkpoints and the one "
                                          r"being written need about 0.0\d GiB"):
        load(path)
    monkeypatch.undo()
    load(path)  # and with the room it has, the same config passes


@pytest.mark.parametrize("override, message", [  # the README's examples, word for word
    ("algo.lam=0", "algo.lam: must be > 0, got 0.0"),
    ("algo.lamda=1.25", "algo.lamda: unknown config key; did you mean 'lam'?"),
    ("teachers.0.placement=remote", "teachers[0].placement: 'remote' is not one of ['colocated', 'dedicated', 'sglang']"),
])
def test_the_readme_error_examples_are_the_real_ones(override, message, tiny_checkpoints, tmp_path):
    with pytest.raises(ConfigError) as error:
        load(write_run(tmp_path, tiny_checkpoints), [override])
    assert str(error.value) == message
    assert f"`config error: {message}`" in (ROOT / "README.md").read_text().replace("\n", " ")


@pytest.mark.parametrize("dtype, distributed_optimizer, accepted", [
    ("fp32", True, True), ("bf16", True, True), ("bf16", False, True), ("fp32", False, False)])
def test_offload_optimizer_needs_the_distributed_optimizer_or_bf16(dtype, distributed_optimizer, accepted, tmp_path):
    """README: train.offload_optimizer needs the distributed optimizer or bf16 (else the optimizer steps the model's
    own weights, which the rollout needs on the GPU); without offloading every combination is accepted."""
    settings = [f"student.dtype={dtype}", f"optim.distributed_optimizer={str(distributed_optimizer).lower()}"]
    config = minimal_config(tmp_path)
    assert not load_config(config, settings).train.offload_optimizer  # the default
    if accepted:
        assert load_config(config, [*settings, "train.offload_optimizer=true"]).train.offload_optimizer
    else:
        with pytest.raises(ConfigError, match=r"^train.offload_optimizer: needs optim.distributed_optimizer or "
                                              r"student.dtype bf16 \(otherwise the optimizer steps the model's own "):
            load_config(config, [*settings, "train.offload_optimizer=true"])


@pytest.mark.parametrize("tp, engine_tp, accepted", [
    (1, None, True), (1, 1, True), (1, 2, False), (2, None, True), (2, 1, True), (2, 2, True), (2, 4, False),
    (4, 2, False)])
def test_rollout_engine_tp_is_1_or_the_students_tp(tp, engine_tp, accepted, tmp_path):
    """README: the SGLang engine spans rollout.engine_tp of each replica's first-stage TP ranks, 1 or the student's
    TP (the default, null); any other value is a config error naming the key (the engines built from it:
    tests/test_sglang_engine.py)."""
    settings = [f"student.parallel.tp={tp}", f"rollout.engine_tp={'null' if engine_tp is None else engine_tp}"]
    if accepted:
        assert load_config(minimal_config(tmp_path), settings).rollout.engine_tp == engine_tp
    else:
        with pytest.raises(ConfigError) as error:
            load_config(minimal_config(tmp_path), settings)
        assert str(error.value) == f"rollout.engine_tp: must be 1 or student.parallel.tp ({tp}), got {engine_tp}"
