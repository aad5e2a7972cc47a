"""Config plumbing: run-config parsing, coercion, unknown keys."""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.config import from_flat, parse_run_config, to_flat
from shared.errors import ConfigError
from shared.eval.baseline_benchmark import BaselineConfig
from shared.eval.protocol import EvalConfig
from shared.eval.splits import SplitConfig
from shared.federated.task import ToyLinearConfig


def test_parse_run_config_types():
    assert parse_run_config("a=1 b=0.5 c='x y' d=true e=ml-100k") == {
        "a": 1,
        "b": 0.5,
        "c": "x y",
        "d": True,
        "e": "ml-100k",
    }


def test_parse_run_config_rejects_garbage():
    with pytest.raises(ConfigError, match="key=value"):
        parse_run_config("rounds")
    with pytest.raises(ConfigError, match=r"No closing quotation.*close the quote"):
        parse_run_config("rounds='3")
    with pytest.raises(ConfigError, match="'rounds' is given twice"):
        parse_run_config("rounds=1 lr=0.1 rounds=0")
    # every error names the option the text came from (the device's --config, say)
    for text in ("rounds", "rounds='3", "rounds=1 rounds=2", "=1"):
        with pytest.raises(ConfigError, match=r"^--config"):
            parse_run_config(text, flag="--config")


def test_a_value_the_toml_parser_cannot_take_is_text_for_its_field_to_judge():
    """An integer of 5000 digits (Python converts at most 4300) or brackets nested past the
    recursion limit escaped the parser as a bare ValueError / RecursionError: a traceback
    instead of the field's one-line error."""
    from simulation.config import SimulationConfig

    digits = "1" * 5000
    assert parse_run_config(f"name={digits}") == {"name": digits}
    with pytest.raises(ConfigError, match=r"^rounds must be int"):
        from_flat(SimulationConfig, parse_run_config(f"rounds={digits}"))
    nested = "[" * 5000 + "]" * 5000
    assert parse_run_config(f"name={nested}") == {"name": nested}
    with pytest.raises(ConfigError, match=r"^shots must be int"):
        from_flat(SimulationConfig, parse_run_config(f"shots={nested}"))


def test_an_integer_too_large_for_a_float_setting_is_refused_by_name():
    """lr=1 followed by 400 zeros is an integer to TOML, and float() of it raised a bare
    OverflowError: a traceback instead of the setting's error."""
    from simulation.config import SimulationConfig

    huge = "1" + "0" * 400
    with pytest.raises(ConfigError, match=r"^lr must be float, got 1000"):
        from_flat(SimulationConfig, parse_run_config(f"lr={huge}"))


def test_a_value_toml_reads_only_in_part_is_text() -> None:
    """rounds=5#x (a TOML comment) and a quoted value with a line break were read as 5, the
    rest dropped silently; they are text, which a number setting refuses by name."""
    from simulation.config import SimulationConfig

    for text, raw in (("rounds=5#x", "5#x"), ("rounds='5\nlr = 2'", "5\nlr = 2")):
        assert parse_run_config(text) == {"rounds": raw}
        with pytest.raises(ConfigError, match=r"^rounds must be int"):
            from_flat(SimulationConfig, parse_run_config(text))
    assert from_flat(SimulationConfig, parse_run_config("name=run#2")).name == "run#2"
    # whole values still are TOML's: a string with '#', a list, numbers, booleans
    assert parse_run_config("a='\"x#y\"' b=[1,2] c=5 d=1e3 e=true f=1,") == {
        "a": "x#y",
        "b": "[1,2]",
        "c": 5,
        "d": 1000.0,
        "e": True,
        "f": "1,",
    }


def test_a_text_setting_keeps_the_text_as_typed():
    """TOML reads name=true as a boolean and name=1e3 as 1000.0; a text field must get the
    text the user typed (it was the folder 'True', or '1000.0')."""
    from simulation.config import SimulationConfig

    for typed in ("true", "1e3", "0x10", "1_000", "7", "-0.50"):
        values = parse_run_config(f"name={typed} rounds={typed if typed == '7' else 3}")
        config = from_flat(SimulationConfig, values)
        assert config.name == typed and config.rounds in (3, 7)
    assert from_flat(SimulationConfig, parse_run_config("lr=1e-2")).lr == 0.01


def test_from_flat_coerces_and_validates():
    cfg = from_flat(SplitConfig, {"seed": "7", "cold-user-fraction": "0.2"})
    assert cfg.seed == 7 and cfg.cold_user_fraction == 0.2
    assert from_flat(BaselineConfig, {"shots": "1,3"}).shots == (1, 3)
    with pytest.raises(ConfigError, match="valid:"):
        from_flat(SplitConfig, {"sede": 1})
    with pytest.raises(ConfigError, match="seed must be int"):
        from_flat(SplitConfig, {"seed": "abc"})
    with pytest.raises(ConfigError):
        from_flat(SplitConfig, {"public-fraction": 2})
    # a tuple takes "1,3", a TOML list (kept as text by the run-config parser) or one value
    assert from_flat(BaselineConfig, parse_run_config("shots=[1,3]")).shots == (1, 3)
    assert from_flat(BaselineConfig, parse_run_config("shots=2")).shots == (2,)
    with pytest.raises(ConfigError, match="shots must be positive"):
        from_flat(BaselineConfig, parse_run_config('shots="0,-1"'))
    with pytest.raises(ConfigError, match="n-negatives must be >= 1"):
        from_flat(EvalConfig, {"n-negatives": 0})
    with pytest.raises(ConfigError, match="batch-size must be >= 1"):
        from_flat(EvalConfig, {"batch-size": 0})
    # a boolean is not a number, though Python's int(True) is 1
    with pytest.raises(ConfigError, match="seed must be int, got True"):
        from_flat(SplitConfig, {"seed": True})
    with pytest.raises(ConfigError, match="public-fraction must be float"):
        from_flat(SplitConfig, {"public-fraction": False})


def test_one_integer_check_and_one_real_check_for_config_and_splits() -> None:
    """shared.config and shared.eval.splits each defined is_int (the splits' one took numpy's
    integers too); there is one definition, which takes both, and one is_real."""
    import math

    import numpy as np

    import shared.eval.splits as splits
    from shared.config import is_int, is_real

    assert splits.is_int is is_int and splits.is_real is is_real
    assert all(is_int(v) for v in (0, -3, 2**70, np.int64(3), np.uint8(1)))
    assert not any(is_int(v) for v in (True, np.bool_(True), 1.0, "7", None, np.float64(2)))
    assert all(is_real(v) for v in (0, 1.5, np.float32(0.5), np.int64(2), -1e300))
    assert not any(is_real(v) for v in (False, math.nan, math.inf, "1", None, np.float64("nan")))


def test_to_flat_round_trips():
    cfg = BaselineConfig(shots=(1, 5))
    assert from_flat(BaselineConfig, to_flat(cfg)) == cfg


def test_simulation_refuses_a_malformed_device_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from simulation.config import SimulationConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs, as on a GPU host
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert SimulationConfig(device=ok, backend="inprocess").device == ok
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        from_flat(SimulationConfig, {"device": "tpu"})


def test_inprocess_refuses_a_gpu_this_machine_does_not_have(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """backend=inprocess trains the clients in this process: a device it lacks failed every
    client of every round after pretraining, and the run still ended with exit status 0, its
    report labelling the pretrained model "federated". It is refused before any work, and a
    run recorded with a GPU is still read back on a machine without one."""
    import torch

    from simulation.config import SimulationConfig
    from simulation.pipeline import trained_with

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="torch sees no GPU"):
            SimulationConfig(device=device, backend="inprocess")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"only 1 GPU\(s\) are visible"):
        SimulationConfig(device="cuda:1", backend="inprocess")
    gpu_run = to_flat(SimulationConfig(device="cuda:0", backend="inprocess"))
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"simulation": gpu_run}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = trained_with(run / "models" / "model-v3.int8.onnx")
    assert config is not None and config.device == "auto"


def test_inprocess_refuses_the_settings_only_ray_reads(tmp_path: Path) -> None:
    """Threads take no Ray resources: the settings would sit in config.json, unused."""
    from simulation.config import SimulationConfig
    from simulation.pipeline import trained_with

    with pytest.raises(ConfigError, match=r"^num-gpus-per-client only apply to backend=ray"):
        SimulationConfig(backend="inprocess", num_gpus_per_client=0.5)
    flat = {"backend": "inprocess", "num-cpus-per-client": 2.0, "ray-address": "127.0.0.1:1"}
    with pytest.raises(ConfigError, match=r"^num-cpus-per-client, ray-address only apply.*them"):
        from_flat(SimulationConfig, flat)
    assert SimulationConfig(backend="inprocess").num_gpus_per_client == 0.0
    # a model of a Ray run with GPU shares is still read back (for its data and split)
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    ray_run = to_flat(SimulationConfig(num_gpus_per_client=0.25, ray_address="127.0.0.1:1"))
    (run / "config.json").write_text(json.dumps({"simulation": ray_run}))
    config = trained_with(run / "models" / "model-v3.int8.onnx")
    assert config is not None and config.backend == "inprocess"
    assert (config.num_gpus_per_client, config.ray_address) == (0.0, "")


def test_a_blank_cache_or_run_name_is_refused_and_a_blank_cache_variable_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FEDREC_CACHE_DIR=" " sent datasets to the default cache but embeddings and pretrained
    models to a folder named " " here; cache-dir=" " and name=" " did the same."""
    from shared.data.download import default_cache_dir as datasets
    from shared.text.encoder import default_cache_dir as embeddings
    from simulation.config import SimulationConfig
    from simulation.pretrain import default_cache_root

    monkeypatch.setenv("FEDREC_CACHE_DIR", "  ")
    home = Path.home() / ".cache" / "fedrec"
    assert (datasets(), Path(embeddings()), default_cache_root()) == (
        home / "datasets",
        home / "embeddings",
        home,
    )
    for key in ("cache_dir", "name"):
        with pytest.raises(ConfigError, match="must not be blank; omit it for the default"):
            SimulationConfig(**{key: " "})


def test_simulation_refuses_a_cuda_device_its_ray_clients_could_not_see() -> None:
    """Ray hides the GPUs from an actor that reserves none and shows one that reserves a
    share only its own GPU, as cuda:0: both settings would fail every client's first round
    (seen on a GPU machine), so they are refused before any work."""
    from simulation.config import SimulationConfig

    with pytest.raises(ConfigError, match="device=cuda needs a GPU share per client"):
        SimulationConfig(device="cuda")
    with pytest.raises(ConfigError, match="--num-gpus-per-client"):
        from_flat(SimulationConfig, {"device": "cuda:0"})
    # attaching to a cluster skips the local GPU count, not this check
    with pytest.raises(ConfigError, match="as cuda:0; use device=cuda"):
        SimulationConfig(device="cuda:1", num_gpus_per_client=0.5, ray_address="127.0.0.1:1")
    config = SimulationConfig(device="cuda", num_gpus_per_client=0.5, ray_address="127.0.0.1:1")
    assert config.device == "cuda"
    assert SimulationConfig(device="auto").device == "auto"  # CPU clients when none is shared


def test_simulation_passes_checkpoint_keep_to_the_server():
    from simulation.config import SimulationConfig

    config = from_flat(SimulationConfig, parse_run_config("checkpoint-keep=5"))
    assert config.server_run_config(10)["checkpoint-keep"] == 5
    with pytest.raises(ConfigError, match="checkpoint-keep"):
        from_flat(SimulationConfig, {"checkpoint-keep": 0})


def test_the_runs_seed_draws_the_federated_evaluations_negatives_too():
    """``--seed 7`` split the users with 7 but the clients' per-round validation drew its
    negatives with the task's default seed 42."""
    from shared.config import field_names
    from shared.federated.student_config import StudentTaskConfig
    from simulation.config import SimulationConfig

    run_config = SimulationConfig(seed=7).server_run_config(10)
    own = {k: v for k, v in run_config.items() if k in field_names(StudentTaskConfig)}
    files = {"bundle": "b.pt", "state-dir": "state"}  # the pipeline sets them
    assert from_flat(StudentTaskConfig, {**own, **files}).eval_seed == 7


def test_simulation_refuses_an_unknown_teacher_id_init_before_any_work():
    from simulation.config import SimulationConfig

    for ok in ("cooccurrence", "random"):
        assert SimulationConfig(teacher_id_init=ok).teacher_id_init == ok
    with pytest.raises(ConfigError, match="teacher-id-init must be 'cooccurrence' or 'random'"):
        from_flat(SimulationConfig, {"teacher-id-init": "svd"})


def test_simulation_refuses_an_unknown_teacher_order_and_passes_a_known_one_on():
    from simulation.config import SimulationConfig
    from simulation.pretrain import configs_for

    for ok in ("sequence", "set", "auto"):
        config = from_flat(SimulationConfig, {"teacher-order": ok})
        teacher, _ = configs_for(
            3, 2, 0, config.teacher_id_init, config.teacher_order, config.teacher_members
        )
        assert teacher.order == ok and teacher.members == SimulationConfig.teacher_members
    with pytest.raises(ConfigError, match="teacher-order must be one of 'sequence', 'set'"):
        from_flat(SimulationConfig, {"teacher-order": "shuffled"})


def test_simulation_teacher_members_reach_the_teacher_and_zero_is_refused():
    from simulation.config import SimulationConfig
    from simulation.pretrain import configs_for

    config = from_flat(SimulationConfig, {"teacher-members": "2"})
    teacher, _ = configs_for(3, 2, 0, teacher_members=config.teacher_members)
    assert teacher.members == 2
    with pytest.raises(ConfigError, match="teacher-members must be >= 1"):
        from_flat(SimulationConfig, {"teacher-members": "0"})


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ({"adapt-lr": "-1"}, "adapt-lr must be a positive number"),
        ({"adapt-steps": "-1"}, "adapt-steps must be >= 0"),
        ({"prune-sparsity": "1.5"}, "prune-sparsity must be a number in"),
        ({"ray-address": "nonsense"}, "ray-address must be HOST:PORT"),
    ],
)
def test_simulation_refuses_settings_that_used_to_fail_after_pretraining(
    pair: dict[str, str], message: str
) -> None:
    """These were accepted and failed (or, for ray-address, hung) only after pretraining, or,
    for adapt-steps, ran with a negative count."""
    from simulation.config import SimulationConfig

    with pytest.raises(ConfigError, match=message):
        from_flat(SimulationConfig, pair)
    for address in ("127.0.0.1:6379", "auto", "ray://head.local:10001", "[::1]:6379"):
        assert from_flat(SimulationConfig, {"ray-address": address}).ray_address == address


def test_the_simulation_config_imports_without_torch() -> None:
    """Its defaults come from torch-free modules (epochs, ensemble, item_prior) and its torch
    checks import lazily: the teacher-prior default once pulled torch in at import."""
    import subprocess
    import sys

    code = "import sys, simulation.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_simulation_teacher_prior_reaches_the_teacher():
    from simulation.config import SimulationConfig
    from simulation.pretrain import configs_for

    assert from_flat(SimulationConfig, {}).teacher_prior is False
    config = from_flat(SimulationConfig, {"teacher-prior": "true"})
    teacher, _ = configs_for(3, 2, 0, teacher_prior=config.teacher_prior)
    assert teacher.prior is True
    with pytest.raises(ConfigError, match="teacher"):
        from_flat(SimulationConfig, {"teacher-prior": "sometimes"})


def test_benchmarks_take_the_teacher_ensemble_size_from_the_command_line():
    import argparse

    from shared.models.teacher import TeacherConfig
    from simulation.pretrain import add_pretrain_arguments

    parser = argparse.ArgumentParser()
    add_pretrain_arguments(parser, dataset="synthetic")
    assert parser.parse_args([]).teacher_members == TeacherConfig.members
    assert parser.parse_args(["--teacher-members", "3"]).teacher_members == 3
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--teacher-members", bad])


def test_run_config_refuses_a_key_given_in_both_spellings_and_an_empty_run_dir() -> None:
    """cohort_size and cohort-size name one setting: the later one silently won, while the
    same key given twice was refused. An empty run-dir wrote the run into the current
    folder, where the --run-dir flag refuses it."""
    from simulation.config import SimulationConfig

    with pytest.raises(ConfigError, match="'cohort-size' is given twice"):
        from_flat(SimulationConfig, parse_run_config("cohort_size=3 cohort-size=4"))
    with pytest.raises(ConfigError, match="run-dir must not be empty"):
        from_flat(SimulationConfig, parse_run_config("run-dir="))
    assert from_flat(SimulationConfig, parse_run_config("cohort_size=3")).cohort_size == 3


def test_a_typo_gets_the_closest_keys_on_every_config_path() -> None:
    """Only `fedrec server start` suggested the key meant; simulate and a device's --config
    listed some 60 keys and left the reader to find it."""
    from client.device.config import DaemonConfig
    from simulation.config import SimulationConfig

    with pytest.raises(ConfigError, match=r"'noise-multipler'.*did you mean noise-multiplier"):
        from_flat(SimulationConfig, {"noise-multipler": 0.5})
    with pytest.raises(ConfigError, match=r"'candidate-pol'; did you mean candidate-pool"):
        DaemonConfig.from_values({"candidate-pol": 300})
    with pytest.raises(ConfigError, match=r"did you mean bandit-policy\?"):
        DaemonConfig.from_values({"policy": "thompson"})


def test_a_misspelt_exploration_key_is_named_as_typed_with_its_prefix() -> None:
    """``--config bandit-polcy=thompson`` was refused as "unknown config key 'polcy' for
    BanditConfig (did you mean policy?)" with the keys listed unprefixed: the advice,
    ``--config policy=...``, is itself refused (the daemon reads ``bandit-policy``)."""
    from client.device.config import DaemonConfig

    with pytest.raises(ConfigError) as refused:
        DaemonConfig.from_values({"bandit-polcy": "thompson"})
    message = str(refused.value)
    assert "'bandit-polcy'" in message
    assert "did you mean bandit-policy" in message
    assert "did you mean policy" not in message
    assert DaemonConfig.from_values({"bandit_policy": "thompson"}).exploration.policy == "thompson"


def test_simulation_takes_secagg_shares_as_a_count_or_a_fraction_like_the_server() -> None:
    """`fedrec simulate` refused secagg-num-shares=0.5, which the server and `fedrec server
    start` read as half the cohort. (With a fractional threshold too: an integer one is no
    strict majority of the shares of large cohorts, which the server refuses.)"""
    from simulation.config import SimulationConfig

    flat = {"secagg-num-shares": "0.5", "secagg-reconstruction-threshold": "0.6"}
    config = from_flat(SimulationConfig, flat)
    assert config.secagg_num_shares == 0.5
    server = config.server_run_config(100)
    assert server["secagg-num-shares"] == 0.5
    from server.server_app import ServerConfig

    ServerConfig.from_run_config(server)  # the server takes it
    flat = {"secagg-num-shares": "7", "secagg-reconstruction-threshold": "4"}
    assert from_flat(SimulationConfig, flat).secagg_num_shares == 7


# ------------------------------------------------------------- one coercion rule for all readers


@dataclass(frozen=True)
class _Typed:
    count: int = 1
    share: float = 0.5
    flag: bool = False
    fraction: int | float = 5


def _read_flat(key: str, value: object) -> object:
    return getattr(from_flat(_Typed, {key: value}), key)


def _read_server(key: str, value: object) -> object:
    from server.server_app import ServerConfig  # Flower: imported only here

    return getattr(ServerConfig.from_run_config({key: value}), key.replace("-", "_"))


def _read_toy(key: str, value: object) -> object:
    return getattr(ToyLinearConfig.from_run_config({key: value}), key.removeprefix("toy-"))


#: Each reader of run-config values: its key for each kind of field it has, and how it
#: reads ``{key: value}`` into the field's value.
_READERS: dict[str, tuple[dict[str, str], Callable[[str, object], object]]] = {
    "from_flat": (
        {"count": "count", "share": "share", "flag": "flag", "fraction": "fraction"},
        _read_flat,
    ),
    "server": (
        {
            "count": "num-rounds",
            "share": "round-timeout",
            "flag": "secagg",
            "fraction": "secagg-num-shares",
        },
        _read_server,
    ),
    "toy": ({"count": "toy-dim", "share": "toy-noise"}, _read_toy),
}

#: (field kind, value given, the value read, or the error after the key's name)
_COERCION_TABLE: list[tuple[str, object, object]] = [
    ("count", 2, 2),
    ("count", 2.0, 2),  # an integral float is the integer
    ("count", "3", 3),
    ("count", "3.0", 3),  # integral text too (a number sent as text)
    ("count", "2.5", "must be int, got '2.5'"),
    ("count", 2.5, "must be int, got 2.5"),
    ("count", True, "must be int, got True"),
    ("count", "two", "must be int, got 'two'"),
    ("share", 1, 1.0),
    ("share", "0.25", 0.25),
    ("share", True, "must be float, got True"),
    ("flag", True, True),
    ("flag", 1, True),  # a bool given as an int
    ("flag", 0, False),
    ("flag", "yes", True),
    ("flag", 2, "must be true or false, got 2"),
    ("fraction", 5, 5),  # an int | float keeps the type given: 5 devices...
    ("fraction", 1.0, 1.0),  # ... or all of the cohort, not 1 device
    ("fraction", 0.5, 0.5),
]


@pytest.mark.parametrize(
    ("reader", "kind", "given", "expected"),
    [
        (reader, *row)
        for reader, (keys, _) in sorted(_READERS.items())
        for row in _COERCION_TABLE
        if row[0] in keys
    ],
)
def test_every_reader_coerces_a_value_the_same_way(
    reader: str, kind: str, given: object, expected: object
) -> None:
    """The server's settings, the toy task's and from_flat (the CLI, the clients' training)
    read a value by one rule: num-rounds=2.0 was 2 for the server but refused by the toy
    task (toy-dim=4.0), and secagg=1 was refused by the server but true for from_flat."""
    keys, read = _READERS[reader]
    key = keys[kind]
    if isinstance(expected, str) and expected.startswith("must be"):
        with pytest.raises(ConfigError, match=f"^{re.escape(f'{key} {expected}')}$"):
            read(key, given)
        return
    value = read(key, given)
    assert value == expected and type(value) is type(expected)


def test_a_home_of_no_user_is_a_config_error_not_a_runtime_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``data-dir=~datasets/ml-100k`` (a slash forgotten) or a ``text-model``,
    ``cache-dir`` or ``$FEDREC_CACHE_DIR`` under the home of a user that does not exist
    ended in pathlib's "RuntimeError: Could not determine home directory", a traceback."""
    from shared.data.registry import load_dataset
    from shared.io import cache_root
    from simulation.config import SimulationConfig

    nobody = "~no-such-user-x/ml-100k"
    for key in ("data-dir", "cache-dir", "run-dir"):
        values = {"dataset": "ml-100k", key: nobody}
        with pytest.raises(ConfigError, match="~no-such-user-x names no home folder"):
            from_flat(SimulationConfig, values)
    with pytest.raises(ConfigError, match="~no-such-user-x names no home folder"):
        load_dataset("ml-100k", nobody)
    monkeypatch.setenv("FEDREC_CACHE_DIR", nobody)
    with pytest.raises(ConfigError, match="~no-such-user-x names no home folder"):
        cache_root()


def test_no_home_folder_names_the_cache_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME unset for a user the password database does not know (``docker run -u 12345``,
    a bare systemd unit): ``fedrec simulate`` ended in pathlib's "RuntimeError: Could not
    determine home directory", a traceback; now an error naming FEDREC_CACHE_DIR."""
    import pwd

    from shared.data.download import default_cache_dir as datasets
    from simulation.pretrain import default_cache_root

    def unknown(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("FEDREC_CACHE_DIR", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown)
    for where in (default_cache_root, datasets):
        with pytest.raises(ConfigError, match=r"HOME is unset.*set FEDREC_CACHE_DIR"):
            where()
    monkeypatch.setenv("FEDREC_CACHE_DIR", "/srv/cache")  # the fix it names
    assert default_cache_root() == Path("/srv/cache")


def test_each_run_config_repetition_is_split_on_its_own() -> None:
    """Repetitions of --run-config / --config were joined into one text before shell-style
    splitting, so a quote left open in one swallowed the next: ``a=it's`` then ``b=isn't``
    silently read as a = "its b=isnt". Each is split on its own now: the open quote is an
    error naming the flag; a key given twice across repetitions is still refused."""
    from fedrec.options import parsed_entries

    assert parsed_entries(["a=1", "b='x y'"]) == {"a": 1, "b": "x y"}
    assert parsed_entries(None) == {}
    with pytest.raises(ConfigError, match='--config: cannot split "a=it\'s"'):
        parsed_entries(["a=it's", "b=isn't"], flag="--config")
    with pytest.raises(ConfigError, match="'a' is given twice"):
        parsed_entries(["a=1", "a=2"])


def test_a_toml_list_of_text_gives_its_strings_not_their_quotes() -> None:
    """export-recs='["teacher", "pop"]' (a TOML list, quoted for its space) was split on its
    commas as text, each model name with its TOML quotes ('"teacher"'), and refused as an
    unknown model; the list's strings are the values, as TOML reads them."""
    from simulation.config import SimulationConfig

    for text in ("""export-recs='["teacher", "pop"]'""", """export-recs='["teacher","pop",]'"""):
        config = from_flat(SimulationConfig, parse_run_config(text))
        assert config.export_recs == ("teacher", "pop")
    assert from_flat(SimulationConfig, parse_run_config("export-recs=[]")).export_recs == ()
    # the forms that worked still do: a bare list (the shell took its quotes), commas
    for text in ('export-recs=["teacher","pop"]', "export-recs=teacher,pop"):
        assert from_flat(SimulationConfig, parse_run_config(text)).export_recs == (
            "teacher",
            "pop",
        )
    assert from_flat(BaselineConfig, parse_run_config("shots='[1, 3]'")).shots == (1, 3)
    with pytest.raises(ConfigError, match=r"^shots must be int"):
        from_flat(BaselineConfig, parse_run_config("shots='[[1], 3]'"))
    with pytest.raises(ConfigError, match=r"^shots must be int"):  # no comment dropped
        from_flat(BaselineConfig, parse_run_config("shots='[1, 3] #5'"))


@pytest.mark.parametrize(("dp", "max_weight"), [(True, 1.0), (False, 250.0)])
def test_a_dp_simulations_secagg_quantizes_its_unit_weight_updates_at_full_precision(
    dp: bool, max_weight: float
) -> None:
    """Under record-level DP every client reports weight 1 (its example count is not DP),
    and SecAgg+ scales an update by weight / max-weight before quantizing it: with the
    default max-weight 1000 each update went through a grid 1000 times coarser (a step of
    3.8e-3 per coordinate against DP noise of about 4.7e-3 per step) for nothing. The
    simulation sets max-weight 1 then, as the server does under user-level DP."""
    from server.server_app import ServerConfig
    from simulation.config import SimulationConfig

    config = from_flat(SimulationConfig, {"dp": dp, "secagg-max-weight": 250.0})
    server = ServerConfig.from_run_config(config.server_run_config(100))
    assert server.secagg_settings is not None
    assert server.secagg_settings.max_weight == max_weight
