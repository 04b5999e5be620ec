"""Experiment configuration: one validated, hashable description of a run, sweeps and templates.

The names follow the seed (``ExperimentConfig``, ``ParameterSweepConfig``, ``ConfigTemplates``).
A config is validated when it is built, so a typo in a file or on the command line fails at once
with a :class:`~fxsdc.errors.UserError` naming the field, not hours into a sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fxsdc.errors import UserError

LOCATIONS = ("q", "k", "v", "scores", "weights", "out")
BOUND_TYPES = ("s@w", "q@o", "comb")
CHECKS = ("bounds", "bounds-qo", "comb", "softmax", "abft")
REFERENCES = ("online", "baseline")
FAULT_MODELS = ("bitflip", "multibit", "probabilistic")
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
# The seed's (bounds_check, bound_type) pair names one bounds check; ``checks`` generalises it.
BOUND_TYPE_CHECK = {"s@w": "bounds", "q@o": "bounds-qo", "comb": "comb"}
_DEVICE_RE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def _reject_unknown_kwargs(cls: type) -> type:
    """Make ``cls(**kwargs)`` raise UserError (not TypeError) for a field that does not exist.

    The CLI and config files build configs from user text, so an unknown name is a user mistake.
    """
    init = cls.__init__
    names = tuple(f.name for f in dataclasses.fields(cls))

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise UserError(f"unknown config field {unknown[0]!r}; fields are: {', '.join(names)}")
        init(self, *args, **kwargs)

    cls.__init__ = checked_init  # type: ignore[method-assign]
    return cls


@_reject_unknown_kwargs
@dataclass
class ExperimentConfig:
    """What to run: model, data, fault and detectors. Validated on construction."""

    exp_name: str = "experiment"
    seed: int = 42
    model_name: str = "gpt2"
    dataset_name: str = "wikitext-2-raw-v1"
    dataset_config: str | None = None  # HF config name when dataset_name is a bare repo id
    dataset_split: str = "test"
    batch_size: int = 4
    seq_length: int = 128
    num_samples: int = 20  # sequences drawn from the dataset
    num_runs: int = 1  # faults tried per sequence
    injection_enabled: bool = True
    injection_location: str = "scores"
    injection_layers: list[int] | None = None  # None: every layer
    injection_idx: tuple[int, int, int, int] | None = None  # None: random per trial
    injection_bit: int = 30
    bounds_check: bool = True
    bound_type: str = "s@w"
    tolerance: float | None = None  # None: derived from the dtype's unit roundoff
    checks: list[str] | None = None  # None: derived from bounds_check/bound_type (seed fields)
    reference: str = "online"
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False
    fault_model: str = "bitflip"
    bits: list[int] | None = None  # flipped bits, fault_model="multibit" only
    ber: float | None = None  # bit error rate per element, fault_model="probabilistic" only
    tiny: bool = False  # use the model's randomly initialised tiny variant
    trials_per_pass: int = 1  # independent faults per forward pass, one per batch element

    FIELDS: ClassVar[tuple[str, ...]]

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()

    # -- validation -------------------------------------------------------------------------
    def _check_types(self) -> None:
        for name, hint in _TYPE_HINTS.items():
            setattr(self, name, _coerce(name, getattr(self, name), hint))

    def _check_values(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise UserError(
                    f"config field {name}={getattr(self, name)!r} is invalid; allowed: {allowed}"
                )

        def choice(name: str, options: tuple[str, ...]) -> None:
            need(getattr(self, name) in options, name, ", ".join(options))

        for name in ("exp_name", "model_name", "dataset_name", "dataset_split"):
            need(bool(getattr(self, name).strip()), name, "a non-empty string")
        need(
            self.dataset_config is None or bool(self.dataset_config.strip()),
            "dataset_config",
            "a non-empty string or null",
        )
        for name in ("batch_size", "seq_length", "num_samples", "num_runs"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.seed >= 0, "seed", "an integer >= 0")
        choice("injection_location", LOCATIONS)
        choice("bound_type", BOUND_TYPES)
        choice("reference", REFERENCES)
        choice("dtype", tuple(DTYPE_BITS))
        choice("fault_model", FAULT_MODELS)
        need(bool(_DEVICE_RE.match(self.device)), "device", "cpu, cuda, cuda:N, mps, xpu, xpu:N")
        width = DTYPE_BITS[self.dtype]
        need(0 <= self.injection_bit < width, "injection_bit", f"0..{width - 1} for {self.dtype}")
        if self.injection_layers is not None:
            layers = self.injection_layers
            need(
                bool(layers) and min(layers) >= 0 and len(set(layers)) == len(layers),
                "injection_layers",
                "null (all layers) or a non-empty list of distinct layer indices >= 0",
            )
        if self.injection_idx is not None:
            need(
                min(self.injection_idx) >= 0 and self.injection_idx[0] < self.batch_size,
                "injection_idx",
                f"null (random) or 4 indices >= 0 with batch index < batch_size={self.batch_size}",
            )
        need(
            self.tolerance is None or self.tolerance > 0,
            "tolerance",
            "null (derived) or a number > 0",
        )
        if self.checks is not None:
            need(
                len(set(self.checks)) == len(self.checks) and set(self.checks) <= set(CHECKS),
                "checks",
                f"null (from bounds_check/bound_type) or distinct names from {', '.join(CHECKS)}",
            )
        if self.bits is not None:
            need(
                bool(self.bits)
                and len(set(self.bits)) == len(self.bits)
                and all(0 <= b < width for b in self.bits),
                "bits",
                f"a non-empty list of distinct bits in 0..{width - 1} for {self.dtype}",
            )
        need(
            self.fault_model != "multibit" or self.bits is not None,
            "bits",
            "a list of bits (required by fault_model='multibit')",
        )
        if self.ber is not None:
            need(0 < self.ber <= 1, "ber", "a bit error rate in (0, 1]")
        need(
            self.fault_model != "probabilistic" or self.ber is not None,
            "ber",
            "a bit error rate in (0, 1] (required by fault_model='probabilistic')",
        )
        need(
            1 <= self.trials_per_pass <= self.batch_size,
            "trials_per_pass",
            f"1..batch_size ({self.batch_size})",
        )

    # -- derived ----------------------------------------------------------------------------
    @property
    def active_checks(self) -> list[str]:
        """The checks to insert: ``checks`` if given, else the seed's single bounds check."""
        if self.checks is not None:
            return list(self.checks)
        return [BOUND_TYPE_CHECK[self.bound_type]] if self.bounds_check else []

    @property
    def config_id(self) -> str:
        """Stable id: first 16 hex chars of the sha256 of the canonical JSON of every field that
        can change a result. ``trials_per_pass`` cannot (the runner gives identical trials either
        way), so a sweep resumed with another value skips the trials it already stored."""
        fields = {k: v for k, v in self.to_dict().items() if k != "trials_per_pass"}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples become lists), in field order."""
        d = dataclasses.asdict(self)
        if d["injection_idx"] is not None:
            d["injection_idx"] = list(d["injection_idx"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        if not isinstance(data, dict):
            raise UserError(
                f"a config must be a mapping of field names to values, not {type(data).__name__}"
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write JSON, or YAML for a ``.yaml``/``.yml`` path (needs PyYAML)."""
        path = Path(path)
        if _is_yaml(path):
            text = _yaml_module(path).safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise UserError(f"{path}: cannot write config: {e.strerror or e}") from e

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        path = Path(path)
        data = read_config_file(path)
        try:
            return cls.from_dict(data)
        except UserError as e:
            raise UserError(f"{path}: {e}") from e


ExperimentConfig.FIELDS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
_TYPE_HINTS = {
    name: hint
    for name, hint in typing.get_type_hints(ExperimentConfig).items()
    if name in ExperimentConfig.FIELDS
}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type hint; return it normalised (int->float, list->tuple).

    Normalising makes equal configs hash equal whatever the source (``1`` vs ``1.0`` in JSON,
    a list vs a tuple for ``injection_idx``).
    """
    expected = _type_name(hint)
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    bad = UserError(f"config field {name}={value!r} has the wrong type; expected {expected}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and len(value) != len(args):
            raise bad
        try:
            items = [_coerce(name, v, args[0]) for v in value]
        except UserError:
            raise bad from None
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if not isinstance(value, hint):
        raise bad
    return value


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    origin = typing.get_origin(hint)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return hint.__name__


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def _yaml_module(path: Path) -> Any:
    try:
        import yaml
    except ImportError as e:
        raise UserError(
            f"{path}: YAML configs need PyYAML (pip install pyyaml); use .json instead"
        ) from e
    return yaml


def _yaml_load(path: Path, text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-7`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-7``); a hand-written ``ber: 1e-7``
    would otherwise arrive as a string and fail the type check.
    """
    yaml = _yaml_module(path)

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return yaml.load(text, Loader=Loader)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class ParameterSweepConfig:
    """The Cartesian product of ``sweep_params`` values applied to ``base_config``."""

    def __init__(self, base_config: ExperimentConfig, sweep_params: dict[str, list[Any]]) -> None:
        for key, values in sweep_params.items():
            if key not in ExperimentConfig.FIELDS:
                raise UserError(
                    f"unknown sweep parameter {key!r}; "
                    f"fields are: {', '.join(ExperimentConfig.FIELDS)}"
                )
            if not isinstance(values, (list, tuple)) or not values:
                raise UserError(
                    f"sweep parameter {key} needs a non-empty list of values, not {values!r}"
                )
            canon = [json.dumps(v, sort_keys=True, default=repr) for v in values]
            if len(set(canon)) != len(canon):
                raise UserError(f"sweep parameter {key} repeats a value: {list(values)!r}")
        self.base_config = base_config
        self.sweep_params = {k: list(v) for k, v in sweep_params.items()}

    def __len__(self) -> int:
        n = 1
        for values in self.sweep_params.values():
            n *= len(values)
        return n

    def generate_configs(self) -> list[ExperimentConfig]:
        """One config per point, the last key varying fastest; exp_name gains ``-key=value``."""
        keys = list(self.sweep_params)
        base = self.base_config.to_dict()
        configs = []
        for point in itertools.product(*(self.sweep_params[k] for k in keys)):
            changes = dict(zip(keys, point))
            suffix = "".join(f"-{k}={_compact(v)}" for k, v in changes.items())
            data = {**base, **changes}
            data["exp_name"] = f"{data['exp_name']}{suffix}"
            try:
                configs.append(ExperimentConfig.from_dict(data))
            except UserError as e:
                raise UserError(f"sweep point {suffix[1:]}: {e}") from e
        return configs


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


SEED_BITS_QUICK = [0, 7, 15, 23, 31]
SEEDS_QUICK = [42, 123]
SEEDS_MEDIUM = [42, 123, 456, 789]
# The seed's large sweep used EleutherAI/pythia-160m (GPT-NeoX), which HF's fx tracer does not
# support at any transformers version; OPT is the traceable decoder we use in its place.
LARGE_MODELS = ["gpt2", "distilbert-base-uncased", "facebook/opt-125m"]
# The seed's large sweep used openwebtext: ~40 GB to download, not loadable offline, and without
# a test split. Two WikiText sizes keep the dataset axis at two entries.
LARGE_DATASETS = ["wikitext-103-raw-v1", "wikitext-2-raw-v1"]


def read_config_file(path: Path, what: str = "config") -> Any:
    """The parsed content of a JSON or YAML file; an unreadable or malformed file is a one-line
    UserError naming ``what``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{path}: cannot read {what}: {reason}") from e
    try:
        return _yaml_load(path, text) if _is_yaml(path) else json.loads(text)
    except Exception as e:  # json.JSONDecodeError or yaml.YAMLError; both mean a malformed file
        raise UserError(f"{path}: malformed {what}: {_one_line(e)}") from e


class ConfigTemplates:
    """Predefined sweeps, including the seed's quick / medium / large experiment sizes.

    Templates run one trial per batch element in each forward pass (trials_per_pass =
    batch_size): the trials are the same as one per pass (the runner tests it), many times
    faster."""

    @staticmethod
    def bit_sweep(
        base: ExperimentConfig | None = None, location: str = "scores"
    ) -> ParameterSweepConfig:
        """Every bit of the dtype (32 for float32) at one location."""
        base = base or ExperimentConfig(exp_name="bit_sweep", trials_per_pass=4)
        base = dataclasses.replace(base, injection_location=location)
        return ParameterSweepConfig(base, {"injection_bit": list(range(DTYPE_BITS[base.dtype]))})

    @staticmethod
    def location_sweep(base: ExperimentConfig | None = None) -> ParameterSweepConfig:
        """The six attention locations at the base config's bit."""
        base = base or ExperimentConfig(exp_name="location_sweep", trials_per_pass=4)
        return ParameterSweepConfig(base, {"injection_location": list(LOCATIONS)})

    @staticmethod
    def layer_sweep(
        num_layers: int = 12, base: ExperimentConfig | None = None
    ) -> ParameterSweepConfig:
        """One layer at a time, 0..num_layers-1."""
        if num_layers < 1:
            raise UserError(f"layer_sweep needs num_layers >= 1, not {num_layers}")
        base = base or ExperimentConfig(exp_name="layer_sweep", trials_per_pass=4)
        return ParameterSweepConfig(base, {"injection_layers": [[i] for i in range(num_layers)]})

    @staticmethod
    def quick() -> ParameterSweepConfig:
        """Seed's quick check: 5 bits x 2 locations x 2 seeds = 20 configs on DistilBERT."""
        base = ExperimentConfig(
            exp_name="quick",
            model_name="distilbert-base-uncased",
            dataset_name="wikitext-2-raw-v1",
            batch_size=4,
            trials_per_pass=4,
            num_samples=20,
            num_runs=3,
        )
        return ParameterSweepConfig(
            base,
            {
                "injection_bit": SEED_BITS_QUICK,
                "injection_location": ["scores", "weights"],
                "seed": SEEDS_QUICK,
            },
        )

    @staticmethod
    def medium() -> ParameterSweepConfig:
        """Seed's medium sweep: 32 bits x 6 locations x 4 seeds = 768 configs on GPT-2."""
        return ParameterSweepConfig(_medium_base("medium"), _medium_params())

    @staticmethod
    def large() -> ParameterSweepConfig:
        """Seed's large sweep: 3 models x 2 datasets x the medium sweep = 4608 configs."""
        params = {"model_name": LARGE_MODELS, "dataset_name": LARGE_DATASETS, **_medium_params()}
        return ParameterSweepConfig(_medium_base("large"), params)

    @classmethod
    def names(cls) -> list[str]:
        return ["bit_sweep", "location_sweep", "layer_sweep", "quick", "medium", "large"]

    @classmethod
    def get(cls, name: str) -> ParameterSweepConfig:
        """The named template with its default arguments."""
        if name not in cls.names():
            raise UserError(f"unknown template {name!r}; templates are: {', '.join(cls.names())}")
        return getattr(cls, name)()


def _medium_base(name: str) -> ExperimentConfig:
    return ExperimentConfig(
        exp_name=name,
        model_name="gpt2",
        dataset_name="wikitext-103-raw-v1",
        batch_size=8,
        trials_per_pass=8,
        num_samples=100,
        num_runs=5,
    )


def _medium_params() -> dict[str, list[Any]]:
    return {
        "injection_bit": list(range(32)),
        "injection_location": list(LOCATIONS),
        "seed": SEEDS_MEDIUM,
    }
