"""ExperimentConfig validation, ids, files; sweeps and the seed's templates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsdc.config import (
    CHECKS,
    DTYPE_BITS,
    LOCATIONS,
    ConfigTemplates,
    ExperimentConfig,
    ParameterSweepConfig,
)
from fxsdc.errors import UserError


def test_defaults_are_valid_and_match_the_seed() -> None:
    c = ExperimentConfig()
    assert (c.model_name, c.dataset_name, c.batch_size, c.seq_length) == (
        "gpt2",
        "wikitext-2-raw-v1",
        4,
        128,
    )
    assert (c.injection_bit, c.injection_location) == (30, "scores")
    assert c.active_checks == ["bounds"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["bounds"]),
        ({"bound_type": "q@o"}, ["bounds-qo"]),
        ({"bound_type": "comb"}, ["comb"]),
        ({"bounds_check": False}, []),
        ({"checks": ["softmax", "abft"]}, ["softmax", "abft"]),
        ({"checks": [], "bounds_check": True}, []),
    ],
)
def test_active_checks_follow_seed_fields_unless_checks_given(
    kwargs: dict, expected: list[str]
) -> None:
    assert ExperimentConfig(**kwargs).active_checks == expected


def test_unknown_field_is_a_user_error_naming_it() -> None:
    with pytest.raises(UserError, match="unknown config field 'injection_site'"):
        ExperimentConfig(injection_site="scores")
    with pytest.raises(UserError, match="unknown config field 'bogus'"):
        ExperimentConfig.from_dict({"seed": 1, "bogus": 2})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", "4"),
        ("batch_size", 4.0),
        ("seed", True),  # bool is an int subclass; still not a seed
        ("injection_enabled", 1),
        ("tolerance", "1e-6"),
        ("injection_idx", [0, 0, 1]),
        ("injection_idx", [0, 0, 1, "2"]),
        ("injection_layers", [1, "a"]),
        ("injection_layers", 3),
        ("checks", "bounds"),
        ("model_name", None),
    ],
)
def test_wrong_type_is_a_user_error_naming_field_and_type(field: str, value: object) -> None:
    with pytest.raises(UserError, match=rf"config field {field}=.*wrong type; expected"):
        ExperimentConfig(**{field: value})


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"injection_location": "attn"}, "injection_location", "q, k, v, scores, weights, out"),
        ({"injection_bit": 32}, "injection_bit", "0..31 for float32"),
        ({"injection_bit": -1}, "injection_bit", "0..31"),
        ({"injection_bit": 16, "dtype": "bfloat16"}, "injection_bit", "0..15 for bfloat16"),
        ({"injection_bit": 16, "dtype": "float16"}, "injection_bit", "0..15 for float16"),
        ({"dtype": "float64"}, "dtype", "float32, bfloat16, float16"),
        ({"bound_type": "sw"}, "bound_type", "s@w, q@o, comb"),
        ({"reference": "clean"}, "reference", "online, baseline"),
        ({"checks": ["bounds", "bounds"]}, "checks", "distinct"),
        ({"checks": ["parity"]}, "checks", "softmax, abft"),
        ({"fault_model": "stuck-at"}, "fault_model", "bitflip, multibit, probabilistic"),
        ({"fault_model": "multibit"}, "bits", "required by fault_model='multibit'"),
        ({"fault_model": "multibit", "bits": [3, 32]}, "bits", "0..31"),
        ({"fault_model": "probabilistic"}, "ber", "required by fault_model='probabilistic'"),
        ({"ber": 0.0}, "ber", r"\(0, 1\]"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"seq_length": -3}, "seq_length", ">= 1"),
        ({"trials_per_pass": 5}, "trials_per_pass", r"1..batch_size \(4\)"),
        ({"injection_idx": (4, 0, 0, 0)}, "injection_idx", "batch index < batch_size=4"),
        ({"injection_layers": []}, "injection_layers", "non-empty"),
        ({"injection_layers": [1, 1]}, "injection_layers", "distinct"),
        ({"tolerance": -1.0}, "tolerance", "> 0"),
        ({"device": "gpu"}, "device", "cuda:N"),
        ({"model_name": "  "}, "model_name", "non-empty"),
    ],
)
def test_out_of_range_is_a_user_error_naming_field_and_allowed_values(
    kwargs: dict, field: str, allowed: str
) -> None:
    with pytest.raises(UserError, match=rf"config field {field}=.*invalid; allowed: .*{allowed}"):
        ExperimentConfig(**kwargs)


def test_accepted_edge_values() -> None:
    assert ExperimentConfig(dtype="bfloat16", injection_bit=15).injection_bit == 15
    assert (
        ExperimentConfig(device="cuda:1", model_name="any/name-the-registry-checks").device
        == "cuda:1"
    )
    c = ExperimentConfig(
        fault_model="multibit", bits=[0, 31], trials_per_pass=4, checks=list(CHECKS)
    )
    assert c.bits == [0, 31]


def test_config_id_is_stable_and_normalised() -> None:
    a = ExperimentConfig(tolerance=1, injection_idx=[0, 1, 2, 3])
    b = ExperimentConfig(tolerance=1.0, injection_idx=(0, 1, 2, 3))
    assert a == b and a.config_id == b.config_id
    assert len(a.config_id) == 16 and int(a.config_id, 16) >= 0
    assert ExperimentConfig(seed=43).config_id != ExperimentConfig().config_id
    assert ExperimentConfig(checks=["bounds"]).config_id != ExperimentConfig().config_id


def test_every_field_changes_the_id() -> None:
    changed = {
        "exp_name": "x",
        "seed": 1,
        "model_name": "opt",
        "dataset_name": "d",
        "dataset_config": "c",
        "dataset_split": "train",
        "batch_size": 8,
        "seq_length": 64,
        "num_samples": 2,
        "num_runs": 2,
        "injection_enabled": False,
        "injection_location": "q",
        "injection_layers": [0],
        "injection_idx": (0, 0, 0, 0),
        "injection_bit": 1,
        "bounds_check": False,
        "bound_type": "comb",
        "tolerance": 0.1,
        "checks": ["abft"],
        "reference": "baseline",
        "dtype": "float32",
        "device": "cuda",
        "compile": True,
        "fault_model": "multibit",
        "bits": [1, 2],
        "ber": 0.5,
        "tiny": True,
    }
    # trials_per_pass changes how trials are batched, not their results: not in the id.
    assert set(changed) | {"trials_per_pass"} == set(ExperimentConfig.FIELDS)
    base = ExperimentConfig(dtype="float16", injection_bit=3)
    ids = {base.config_id}
    for name, value in changed.items():
        extra = {"bits": [1, 2]} if name == "fault_model" else {}
        ids.add(dataclasses.replace(base, **{name: value, **extra}).config_id)
    assert len(ids) == len(changed) + 1
    assert dataclasses.replace(base, trials_per_pass=1).config_id == base.config_id


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip_is_exact(tmp_path: Path, suffix: str) -> None:
    c = ExperimentConfig(
        exp_name="rt",
        injection_idx=(1, 2, 3, 4),
        injection_layers=[0, 5],
        tolerance=1e-7,
        fault_model="probabilistic",
        ber=2.5e-9,
        checks=["softmax", "abft"],
        dtype="bfloat16",
        injection_bit=14,
    )
    path = tmp_path / f"c{suffix}"
    c.save(path)
    loaded = ExperimentConfig.load(path)
    assert loaded == c and loaded.config_id == c.config_id
    assert isinstance(loaded.injection_idx, tuple)
    again = tmp_path / f"again{suffix}"
    loaded.save(again)
    assert again.read_bytes() == path.read_bytes()


def test_hand_written_yaml_exponent_is_a_float(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fault_model: probabilistic\nber: 1e-7\n")
    assert ExperimentConfig.load(path).ber == 1e-7


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("bad.json", '{"seed": 1,', "malformed config"),
        ("bad.yaml", "seed: [1,\n", "malformed config"),
        ("list.json", "[1, 2]", "must be a mapping"),
        ("typo.json", '{"injection_bitt": 3}', "unknown config field 'injection_bitt'"),
        ("range.json", '{"injection_bit": 40}', "injection_bit=40 is invalid"),
        ("binary.json", b"\xff\xfe\x00", "cannot read config"),
    ],
)
def test_malformed_file_is_a_one_line_user_error_with_path(
    tmp_path: Path, name: str, text, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as info:
        ExperimentConfig.load(path)
    message = str(info.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config: No such file"):
        ExperimentConfig.load(tmp_path / "nope.json")


_valid_configs = st.builds(
    lambda dtype, bit, loc, layers, idx, tol, checks, seed: ExperimentConfig(
        dtype=dtype,
        injection_bit=bit % DTYPE_BITS[dtype],
        injection_location=loc,
        injection_layers=layers,
        injection_idx=idx,
        tolerance=tol,
        checks=checks,
        seed=seed,
    ),
    st.sampled_from(list(DTYPE_BITS)),
    st.integers(0, 31),
    st.sampled_from(LOCATIONS),
    st.none() | st.lists(st.integers(0, 47), min_size=1, max_size=4, unique=True),
    st.none()
    | st.tuples(st.integers(0, 3), st.integers(0, 15), st.integers(0, 511), st.integers(0, 511)),
    st.none() | st.floats(min_value=1e-30, max_value=1e3),
    st.none() | st.lists(st.sampled_from(CHECKS), unique=True),
    st.integers(0, 2**32),
)


@settings(max_examples=60, deadline=None)
@given(_valid_configs)
def test_json_round_trip_property(c: ExperimentConfig) -> None:
    back = ExperimentConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.config_id == c.config_id


def test_sweep_order_names_and_len() -> None:
    base = ExperimentConfig(exp_name="s")
    sweep = ParameterSweepConfig(base, {"seed": [1, 2], "injection_bit": [3, 4, 5]})
    configs = sweep.generate_configs()
    assert len(sweep) == len(configs) == 6
    assert [(c.seed, c.injection_bit) for c in configs] == [
        (1, 3),
        (1, 4),
        (1, 5),
        (2, 3),
        (2, 4),
        (2, 5),
    ]
    assert configs[0].exp_name == "s-seed=1-injection_bit=3"
    assert len({c.config_id for c in configs}) == 6
    assert [c.config_id for c in configs] == [c.config_id for c in sweep.generate_configs()]
    assert all(c.model_name == base.model_name for c in configs)


def test_sweep_list_values_get_compact_names() -> None:
    configs = ParameterSweepConfig(
        ExperimentConfig(exp_name="l"), {"injection_layers": [[0], [1, 2]]}
    ).generate_configs()
    assert [c.exp_name for c in configs] == ["l-injection_layers=[0]", "l-injection_layers=[1,2]"]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"bitt": [1]}, "unknown sweep parameter 'bitt'"),
        ({"seed": []}, "non-empty list"),
        ({"seed": 3}, "non-empty list"),
        ({"seed": [1, 1]}, "repeats a value"),
    ],
)
def test_invalid_sweep_is_a_user_error(params: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        ParameterSweepConfig(ExperimentConfig(), params)


def test_invalid_sweep_point_names_the_point() -> None:
    sweep = ParameterSweepConfig(
        ExperimentConfig(dtype="float16", injection_bit=0), {"injection_bit": [15, 16]}
    )
    with pytest.raises(
        UserError, match="sweep point injection_bit=16: config field injection_bit=16"
    ):
        sweep.generate_configs()


def test_seed_templates_sizes_and_contents() -> None:
    quick = ConfigTemplates.quick().generate_configs()
    assert len(quick) == 20
    assert {c.injection_bit for c in quick} == {0, 7, 15, 23, 31}
    assert {c.injection_location for c in quick} == {"scores", "weights"}
    assert {c.seed for c in quick} == {42, 123}
    assert {
        (c.model_name, c.dataset_name, c.batch_size, c.num_samples, c.num_runs) for c in quick
    } == {("distilbert-base-uncased", "wikitext-2-raw-v1", 4, 20, 3)}

    medium = ConfigTemplates.medium().generate_configs()
    assert len(medium) == 768
    assert {c.injection_location for c in medium} == set(LOCATIONS)
    assert {c.seed for c in medium} == {42, 123, 456, 789}
    assert {
        (c.model_name, c.dataset_name, c.batch_size, c.num_samples, c.num_runs) for c in medium
    } == {("gpt2", "wikitext-103-raw-v1", 8, 100, 5)}

    large = ConfigTemplates.large()
    assert len(large) == 4608
    assert large.sweep_params["model_name"] == [
        "gpt2",
        "distilbert-base-uncased",
        "facebook/opt-125m",
    ]
    assert large.sweep_params["dataset_name"] == ["wikitext-103-raw-v1", "wikitext-2-raw-v1"]


def test_simple_templates() -> None:
    bits = ConfigTemplates.bit_sweep(location="weights").generate_configs()
    assert [c.injection_bit for c in bits] == list(range(32))
    assert {c.injection_location for c in bits} == {"weights"}
    assert len(ConfigTemplates.bit_sweep(ExperimentConfig(dtype="bfloat16", injection_bit=3))) == 16
    assert [
        c.injection_location for c in ConfigTemplates.location_sweep().generate_configs()
    ] == list(LOCATIONS)
    assert [c.injection_layers for c in ConfigTemplates.layer_sweep(3).generate_configs()] == [
        [0],
        [1],
        [2],
    ]
    assert len(ConfigTemplates.layer_sweep()) == 12


def test_template_lookup() -> None:
    assert ConfigTemplates.names() == [
        "bit_sweep",
        "location_sweep",
        "layer_sweep",
        "quick",
        "medium",
        "large",
    ]
    for name in ConfigTemplates.names():
        assert isinstance(ConfigTemplates.get(name), ParameterSweepConfig)
    with pytest.raises(
        UserError, match="unknown template 'huge'; templates are: bit_sweep, .*large"
    ):
        ConfigTemplates.get("huge")
