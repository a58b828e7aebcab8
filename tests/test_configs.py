"""Every YAML under configs/ is read against its command's schema, and the schema machinery
(cli.py) behaves as the commands rely on: precedence, unknown keys, types, round trips."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from regionspot_pl import cli
from regionspot_pl.cli import Command, ConfigError, from_dict, load_yaml, option

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/<kind>/*.yaml -> the schema of the command that reads them
SCHEMAS = {
    "fit": ("regionspot_pl.fit", "FitConfig"),
    "test": ("regionspot_pl.test", "TestConfig"),
    "data": ("regionspot_pl.extract.run", "ExtractConfig"),
}


def test_every_config_folder_has_a_schema():
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} == set(SCHEMAS)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_against_its_schema(path):
    module, name = SCHEMAS[path.parent.name]
    schema = getattr(importlib.import_module(module), name)
    data = load_yaml(path)
    config = from_dict(schema, data, str(path))
    # every value written in the file is the value the command gets
    for key, value in data.items():
        got = getattr(config, key)
        if isinstance(value, dict):
            for sub, v in value.items():
                assert getattr(got, sub) == v, (path, key, sub)
        else:
            assert got == value, (path, key)


@dataclass
class Inner:
    size: int = option(3, "a size", minimum=1)
    names: list[str] = option(["a"], "names")


@dataclass
class Outer:
    rate: float = option(0.5, "a rate", minimum=0)
    mode: str = option("x", "a mode", choices=("x", "y"))
    flag: bool = option(False, "a switch")
    maybe: int | None = option(None, "optional", flag="--perhaps")
    inner: Inner = cli.dataclasses.field(default_factory=Inner)


COMMAND = Command(Outer, prog="demo", description="a demo command")


def test_flags_override_yaml_override_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("rate: 2\ninner:\n  size: 5\n")
    config, printing = COMMAND.parse(["--config", str(tmp_path / "c.yaml"), "--size", "7", "--flag", "--names", "p"])
    assert not printing
    assert config == Outer(rate=2.0, flag=True, inner=Inner(size=7, names=["p"]))
    assert isinstance(config.rate, float)  # an int in YAML for a float field
    config, _ = COMMAND.parse(["--perhaps", "4", "--no-flag"])
    assert config.maybe == 4 and config.flag is False
    assert COMMAND.parse(["--perhaps", "none"])[0].maybe is None


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("rates: 1\n", "unknown key 'rates'"),
        ("inner:\n  sise: 1\n", "unknown key 'inner.sise'"),
        ("inner: 3\n", "must be a mapping"),
        ("rate: fast\n", "must be a number"),
        ("mode: z\n", "expected one of: x, y"),
        ("inner:\n  size: 0\n", "must be >= 1"),
        ("flag: 1\n", "true or false"),
        ("inner:\n  names: [1, 2]\n", "a list of strings"),
    ],
)
def test_bad_yaml_is_refused_naming_key_and_file(tmp_path, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as err:
        COMMAND.parse(["--config", str(tmp_path / "c.yaml")])
    assert "c.yaml" in str(err.value)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    (tmp_path / "c.yaml").write_text("rates: 1\n")
    with pytest.raises(ConfigError, match="valid keys: rate, mode, flag, maybe, inner"):
        COMMAND.parse(["--config", str(tmp_path / "c.yaml")])


def test_bad_flags_are_config_errors_not_exits():
    with pytest.raises(ConfigError, match="--size"):
        COMMAND.parse(["--size", "0"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --nope"):
        COMMAND.parse(["--nope"])
    with pytest.raises(ConfigError, match="invalid value 'big'"):
        COMMAND.parse(["--size", "big"])


def test_print_config_round_trips(tmp_path):
    config, printing = COMMAND.parse(["--rate", "0.25", "--mode", "y", "--print-config"])
    assert printing
    (tmp_path / "printed.yaml").write_text(cli.to_yaml(config))
    assert COMMAND.parse(["--config", str(tmp_path / "printed.yaml")])[0] == config


def test_run_command_turns_package_errors_into_one_line(capsys):
    def fails(config):
        raise ConfigError("the thing is wrong: fix it")

    assert cli.run_command(COMMAND, [], fails) == 2
    assert capsys.readouterr().err == "error: the thing is wrong: fix it\n"
    assert cli.run_command(COMMAND, ["--size", "-3"], fails) == 2
    assert capsys.readouterr().err.startswith("error: --size (inner.size) is -3")


def test_positionals_and_preset_defaults(tmp_path, monkeypatch):
    command = Command(Outer, "demo", "", positionals=("mode",), preset_flag="--preset", preset_kind="things",
                      preset_defaults=lambda name: {"rate": 9.0, "mode": "y"})  # fmt: skip
    assert command.parse(["y"])[0].mode == "y" and command.parse(["--mode", "y"])[0].mode == "y"
    (tmp_path / "configs" / "things").mkdir(parents=True)
    (tmp_path / "configs" / "things" / "one.yaml").write_text("mode: x\n")
    monkeypatch.chdir(tmp_path)  # presets are looked up in ./configs first
    config, _ = command.parse(["--preset", "one"])
    assert config.rate == 9.0 and config.mode == "x"  # the preset's YAML wins over what it implies
    assert command.parse(["--preset", "one", "--rate", "1"])[0].rate == 1.0
    with pytest.raises(ConfigError, match="configs/things/two.yaml"):
        command.parse(["--preset", "two"])


@dataclass
class Needs:
    path: str = option(help="the input file")
    kinds: list[str] = option(["a"], "kinds", choices=("a", "b"))


def test_required_fields_and_list_choices():
    command = Command(Needs, "demo", "")
    with pytest.raises(ConfigError, match=r"--path \(path\) is required: the input file"):
        command.parse([])
    assert command.parse(["--path", "p", "--kinds", "a", "b"])[0].kinds == ["a", "b"]
    with pytest.raises(ConfigError, match="is 'c'; expected one of: a, b"):
        command.parse(["--path", "p", "--kinds", "a", "c"])
