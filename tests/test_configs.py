"""The command layer (regionspot_pl.config, on jsonargparse): every shipped preset reads against its
command's settings and holds only what differs from the defaults; flags, YAML files and presets
combine in command-line order; a bad flag, key or file is one line naming it; every command's
--print_config reads back to the same settings; the presets work from an installed wheel."""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml

from regionspot_pl.config import PRESETS, Command, ConfigError, run_command
from regionspot_pl.utils.checks import Range, SettingError, check_settings

ROOT = Path(__file__).resolve().parents[1]
# presets/<kind>/*.yaml -> (the command that reads them, its preset flag)
COMMANDS = {
    "data": ("regionspot_pl.extract.cli", "--preset"),
    "fit": ("regionspot_pl.fit", "--stage"),
    "test": ("regionspot_pl.test", "--split"),
}


def test_every_preset_folder_has_a_command():
    assert {p.name for p in PRESETS.iterdir() if p.is_dir()} == set(COMMANDS)


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    """{'data.batch_size': 8, ...} of a nested mapping."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _get(settings: object, key: str) -> object:
    for part in key.split("."):
        settings = getattr(settings, part)
    return settings


@pytest.mark.parametrize("path", sorted(PRESETS.rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_reads_against_its_command_and_holds_only_differences(path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    module, flag = COMMANDS[path.parent.name]
    command = importlib.import_module(module).COMMAND
    settings = command.parse([flag, path.stem])
    defaults = command.schema(**{f.name: "x" for f in dataclasses.fields(command.schema) if _required(f)})
    for key, value in _leaves(yaml.safe_load(path.read_text())).items():
        assert _get(settings, key) == value, (key, "the command gets what the file says")
        assert _get(defaults, key) != value, (key, "a preset holds only what differs from the defaults")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def test_help_shows_each_setting_with_its_docstring_range_and_default():
    from regionspot_pl import fit

    text = " ".join(fit.COMMAND.parser().format_help().split())
    assert (
        "--trainer.max_steps MAX_STEPS training steps (the paper: 450K) (type: Annotated[int, >= 1], default: 450000)"
        in text
    )
    assert "--data.read_timeout" in text and "--model.variant {auto,BB,BL,BL@336}" in text and "--stage NAME" in text


def test_the_choices_of_the_settings_are_the_librarys():
    """Choices written as Literal types in the light settings modules are those the library runs."""
    from regionspot_pl.evaluation.baselines import BASELINES
    from regionspot_pl.evaluation.settings import METHODS
    from regionspot_pl.model.head import AUTO, VARIANTS
    from regionspot_pl.train.settings import Variant

    assert METHODS == ("regionspot", *BASELINES)
    assert typing.get_args(Variant) == (AUTO, *VARIANTS)


# ------------------------------------------------------------------------ the glue on a small schema
class ThingError(SettingError):
    pass


@dataclass
class Inner:
    """The inner group."""

    size: Annotated[int, Range(1)] = 3
    """a size"""
    names: list[str] = field(default_factory=lambda: ["a"])
    """names"""

    def __post_init__(self) -> None:
        check_settings(self, ThingError)


@dataclass
class Outer:
    """Outer settings."""

    path: str
    """the input file (positional)"""
    rate: Annotated[float, Range(0, 1)] = 0.5
    """a rate"""
    mode: Literal["x", "y"] = "x"
    """a mode"""
    flag: bool = False
    """a switch"""
    maybe: Annotated[int, Range(1)] | None = None
    """optional"""
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        check_settings(self)

    def check(self) -> None:
        if self.mode == "y" and not self.flag:
            raise ConfigError("--mode y needs --flag true")


COMMAND = Command(Outer, "demo", "a demo command", preset_flag="--preset", preset_kind="things",
                  preset_implies=lambda name: {"maybe": len(name)})  # fmt: skip


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working directory with the preset ./configs/things/one.yaml and a YAML writer."""
    (tmp_path / "configs" / "things").mkdir(parents=True)
    (tmp_path / "configs" / "things" / "one.yaml").write_text("rate: 0.25\ninner:\n  size: 5\n")
    monkeypatch.chdir(tmp_path)

    def write(text: str, name: str = "c.yaml") -> str:
        (tmp_path / name).write_text(text)
        return name

    return write


def test_defaults_then_files_and_flags_in_command_line_order(folder):
    assert COMMAND.parse(["p"]) == Outer("p")
    config = folder("rate: 1\ninner:\n  size: 5\n")
    assert COMMAND.parse(["p", "--config", config, "--inner.size", "7", "--flag", "true", "--inner.names", "[q]"]) == (
        Outer("p", rate=1.0, flag=True, inner=Inner(size=7, names=["q"]))
    )
    assert COMMAND.parse(["p", "--inner.size", "7", "--config", config]).inner.size == 5  # the later source wins
    assert isinstance(COMMAND.parse(["p", "--config", config]).rate, float)  # 1 in YAML for a float
    assert COMMAND.parse(["--config", folder("path: from_yaml\n", "p.yaml")]).path == "from_yaml"
    assert COMMAND.parse(["p", "--maybe", "null"]).maybe is None


def test_a_preset_is_looked_up_in_the_working_directory_and_implies_settings(folder):
    settings = COMMAND.parse(["p", "--preset", "one"])
    assert (settings.rate, settings.inner.size, settings.maybe) == (0.25, 5, 3)  # maybe: len("one")
    assert COMMAND.parse(["p", "--preset", "one", "--maybe", "9"]).maybe == 9
    assert COMMAND.parse(["p", "--maybe", "9", "--preset", "one"]).maybe == 9  # implied: only where nothing set it
    with pytest.raises(ConfigError, match=r"no preset 'two': neither ./configs/things/two.yaml nor a shipped one"):
        COMMAND.parse(["p", "--preset", "two"])


@pytest.mark.parametrize(
    ("yaml_text", "fragments"),
    [
        ("rates: 1\n", ["unknown key 'rates' in c.yaml", "valid keys: path, rate, mode, flag, maybe, inner"]),
        ("inner:\n  sise: 1\n", ["unknown key 'inner.sise' in c.yaml", "valid keys of inner: size, names"]),
        ("rate: fast\n", ["--rate must be a number, got fast", "(rate in c.yaml)"]),
        ("mode: z\n", ["--mode must be one of x, y, got z", "(mode in c.yaml)"]),
        ("flag: 1\n", ["--flag must be true or false, got 1"]),
        ("inner:\n  size: 0\n", ["--inner.size is 0; it must be >= 1", "(inner.size in c.yaml)"]),
        ("rate: 2\n", ["--rate is 2.0; it must be in [0, 1]", "(rate in c.yaml)"]),
        ("inner: 3\n", ["--inner must be a mapping of size, names, got 3", "(inner in c.yaml)"]),
        ("- a\n- b\n", ["c.yaml must hold a mapping of settings"]),
        ("{rate: [\n", ["c.yaml is not valid YAML"]),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(folder, yaml_text, fragments):
    with pytest.raises(ConfigError) as err:
        COMMAND.parse(["p", "--config", folder(yaml_text)])
    assert "\n" not in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--inner.size", "0"], ["--inner.size is 0; it must be >= 1"]),
        (["--inner.size", "big"], ["--inner.size must be an integer, got big", "(see demo --help)"]),
        (["--maybe", "x"], ["--maybe must be an integer or null, got x"]),
        (["--nope", "1"], ["unrecognized arguments: --nope 1"]),
        (["--flag"], ["--flag: expected one argument"]),
        (["--config", "missing.yaml"], ["config file not found: missing.yaml"]),
        (["--mode", "y"], ["--mode y needs --flag true"]),  # the command's check(), after the ranges
    ],
)
def test_a_bad_flag_is_one_line_naming_the_flag(folder, argv, fragments):
    with pytest.raises(ConfigError) as err:
        COMMAND.parse(["p", *argv])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_bad_value_names_the_source_that_set_it_last(folder):
    """Files apply where they stand among the flags: the error names the file only when the
    value that stands came from it."""
    zero, other = folder("inner:\n  size: 0\n", "zero.yaml"), folder("rate: 0.1\n", "other.yaml")
    with pytest.raises(ConfigError, match=r"^--inner.size is 0; it must be >= 1 \(inner.size in zero.yaml\)$"):
        COMMAND.parse(["p", "--inner.size", "3", "--config", zero])
    with pytest.raises(ConfigError, match=r"^--inner.size is 0; it must be >= 1$"):
        COMMAND.parse(["p", "--config", zero, "--inner.size", "0"])
    with pytest.raises(ConfigError, match=r"^--inner.size is 0; it must be >= 1$"):
        COMMAND.parse(["p", "--config", other, "--inner.size=0"])


def test_a_missing_positional_is_named():
    with pytest.raises(ConfigError, match="arguments are required: path"):
        COMMAND.parse([])


def test_a_range_error_of_a_nested_group_names_the_group_flag():
    with pytest.raises(ThingError, match=r"^size is 0; it must be >= 1$"):  # made in Python: the field's name
        Inner(size=0)
    assert issubclass(ThingError, SettingError) and issubclass(ConfigError, Exception)


def test_run_command_prints_one_error_line_and_exits_2(capsys):
    def fails(settings):
        raise ConfigError("the thing is wrong: fix it")

    assert run_command(COMMAND, ["p"], fails) == 2
    assert capsys.readouterr().err == "error: the thing is wrong: fix it\n"
    assert run_command(COMMAND, ["p", "--inner.size", "-3"], fails) == 2
    assert capsys.readouterr().err == "error: --inner.size is -3; it must be >= 1\n"
    assert run_command(COMMAND, ["--help"], fails) == 0
    assert "--inner.size" in capsys.readouterr().out


# ------------------------------------------------------------------------ every command's round trip
ROUND_TRIPS = {
    "extract": ("regionspot_pl.extract.cli", [
        "--preset", "o365", "--images", "imgs", "--sam_type", "tiny", "--shard_size", "7", "--masks", "false",
        "--compile", "true", "--precision", "fp32", "--limit", "2", "--clip_size", "null"]),
    "fit": ("regionspot_pl.fit", [
        "--stage", "warmup", "--trainer.max_steps", "3000", "--model.variant", "BL", "--data.mix_weights", "[2]",
        "--optim.milestones", "[10,20]", "--trainer.devices", "2", "--trainer.enable_progress_bar", "false"]),
    "test": ("regionspot_pl.test", ["--split", "lvis_val", "--topk", "100", "--method", "clip-box",
                                    "--batch_size", "8"]),
    "predict": ("regionspot_pl.predict.cli", [
        "--image", "a.jpg", "--points", "1,2 3,4,0", "--vocab", "cat,dog", "--head", "h.pt", "--sam_type", "tiny",
        "--sam_checkpoint", "s.pth", "--clip_model", "clip", "--out", "o.png", "--topk", "2", "--progress",
        "false", "--generator.points_per_side", "8"]),
    "evaluate": ("regionspot_pl.evaluate", ["gt.json", "res.json", "--iou_type", "[bbox,segm]", "--max_dets",
                                            "100", "--out", "runs/eval"]),
    "convert": ("regionspot_pl.convert", ["official.pth", "heads/bl"]),
    "demo.scenes": ("regionspot_pl.demo.scenes", ["demo", "--num_train", "2", "--num_val", "14",
                                                  "--preview", "true"]),
    "tiny": ("regionspot_pl.tiny", ["backbones", "--seed", "3"]),
    "serve": ("regionspot_pl.serve.cli", [
        "--head", "h.pt", "--sam_type", "tiny", "--sam_checkpoint", "s.pth", "--clip_model", "clip", "--port", "8001",
        "--vocabulary", "[lvis=lvis.txt, coco=coco.txt]", "--max_batch_size", "4", "--max_regions", "20"]),
    "app": ("regionspot_pl.app", ["--head", "h.pt", "--sam_type", "tiny", "--sam_checkpoint", "s.pth",
                                  "--clip_model", "clip", "--host", "0.0.0.0", "--max_pixels", "1000000"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_print_config_reads_back_to_the_same_settings(name, tmp_path, capsys, monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    module, argv = ROUND_TRIPS[name]
    command = importlib.import_module(module)
    assert command.main([*argv, "--print_config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert command.COMMAND.parse(["--config", str(tmp_path / "printed.yaml")]) == command.COMMAND.parse(argv)
    assert command.main(["--config", str(tmp_path / "printed.yaml"), "--print_config"]) == 0
    assert capsys.readouterr().out == printed


# ------------------------------------------------------------------------ start-up and installation
HEAVY = ("lightning", "transformers", "pytorch_lightning")
# every command but evaluate, whose own start is measured as the README's check writes it
HELP_COMMANDS = ["convert", "fit", "test", "extract", "predict", "tiny", "demo.scenes", "serve", "app"]
# One process runs each command's --help in turn and names the first after which a heavy module
# is loaded: a command that loads one is found as surely as in a process of its own, and the
# interpreter and torch start once instead of nine times.
HELP_IN_TURN = f"""
import contextlib, io, runpy, sys
names = sys.argv[1:]
for name in names:
    sys.argv = [name, "--help"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        runpy.run_module("regionspot_pl." + name, run_name="__main__", alter_sys=True)
    assert "usage: python -m regionspot_pl." + name in printed.getvalue(), (name, printed.getvalue()[-500:])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
    assert not heavy, ("--help of", name, "imports", heavy[:5])
print("ok", *names)
"""


def _environment(paths: list[str]) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = _environment([str(ROOT / "src"), *_dependency_paths()])
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_evaluate_help_starts_without_lightning_or_transformers(tmp_path):
    proc = _python(["-X", "importtime", "-m", "regionspot_pl.evaluate", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: python -m regionspot_pl.evaluate" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "regionspot_pl.config" in imported  # the measurement sees the package's imports
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, f"--help of evaluate imports {heavy[:5]}"


@pytest.mark.slow
def test_every_commands_help_starts_without_lightning_or_transformers(tmp_path):
    proc = _python(["-c", HELP_IN_TURN, *HELP_COMMANDS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", *HELP_COMMANDS]


def _dependency_paths() -> list[str]:
    """PYTHONPATH entries of this process that do not hold regionspot_pl (e.g. where jsonargparse is)."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [p for p in entries if not (Path(p) / "regionspot_pl").exists()]


@pytest.mark.slow
def test_presets_work_from_a_wheel_outside_the_checkout(tmp_path):
    """The presets ship inside the package: a wheel, unzipped away from the checkout, runs
    ``fit --stage warmup`` and ``test --split lvis_val`` from another working directory."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source)]
    subprocess.run([*build, "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("regionspot_pl-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _environment([str(tmp_path / "site"), *_dependency_paths()])

    def run(*argv: str) -> str:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    location = run("-c", "import regionspot_pl.config as c; print(c.__file__)").strip()
    assert Path(location).is_relative_to(tmp_path / "site")  # the wheel's package, not the checkout's
    fit = yaml.safe_load(run("-m", "regionspot_pl.fit", "--stage", "warmup", "--print_config"))
    assert fit["out"] == "runs/warmup" and fit["data"]["train_shards"] == ["cache/shards/o365"]
    test = yaml.safe_load(run("-m", "regionspot_pl.test", "--split", "lvis_val", "--print_config"))
    assert test["out"] == "runs/test/lvis_val" and test["shards"] == "cache/shards/lvis_val"
