"""Bad flags of ``python -m regionspot_pl.serve`` and ``python -m regionspot_pl.app`` end in one
``error:`` line naming the flag or file, exit code 2 and no traceback, before any model or worker
starts; a head that does not fit the CLIP, found by the server's worker, ends the same way."""

from __future__ import annotations

import socket
import subprocess

import pytest
import torch
from serving import environment, free_port, model_flags, python_module

from regionspot_pl import app
from regionspot_pl.model import RegionSpotHead, save_head
from regionspot_pl.serve import cli


@pytest.fixture(scope="module")
def flags(tiny_backbones, tiny_head, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_cli")
    return {"root": root, "model": model_flags(tiny_head["file"], tiny_backbones, root / "text.h5")}


def without(words: list[str], flag: str) -> list[str]:
    at = words.index(flag)
    return words[:at] + words[at + 2 :]


@pytest.mark.parametrize("main", [cli.main, app.main], ids=["serve", "app"])
@pytest.mark.parametrize(
    "change,fragments",
    [
        ("no head", ["--head is required"]),
        (["--port", "80"], ["--port", "1024"]),
        (["--port", "abc"], ["--port", "abc"]),
        (["--host", "example.com"], ["--host", "127.0.0.1"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--sam_type", "vit_x"], ["--sam_type", "vit_x"]),
        (["--max_regions", "0"], ["--max_regions", ">= 1"]),
        (["--batch_timeout", "-1"], ["--batch_timeout"]),
        (["--vocabulary", "[no_equals_sign]"], ["--vocabulary", "NAME=FILE"]),
        (["--vocabulary", "[a=x.txt, a=y.txt]"], ["--vocabulary", "'a' twice"]),
        (["--vocabulary", "[a=/no/such/vocabulary.txt]"], ["--vocabulary a=/no/such/vocabulary.txt", "not found"]),
        (["--sam_checkpoint", "/no/such.pth"], ["--sam_checkpoint /no/such.pth", "does not exist"]),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40],
)
def test_bad_flags_give_one_error_line(main, change, fragments, flags, cli_error):
    argv = without(flags["model"], "--head") if change == "no head" else [*flags["model"], *change]
    cli_error(main, argv, *fragments)


@pytest.mark.parametrize("main", [cli.main, app.main], ids=["serve", "app"])
def test_a_port_in_use_gives_one_error_line(main, flags, cli_error):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli_error(main, [*flags["model"], "--port", str(port)], f"--port {port}", "cannot be used")


def test_a_bad_vocabulary_file_gives_one_error_line(flags, cli_error):
    words = flags["root"] / "words.txt"
    words.write_text("cat\ndog\ncat\n")
    cli_error(cli.main, [*flags["model"], "--vocabulary", f"[animals={words}]"], f"--vocabulary animals={words}",
              "repeats class names ['cat']")  # fmt: skip


@pytest.mark.slow
def test_a_head_that_does_not_fit_the_clip_gives_one_error_line(flags, tmp_path):
    """Found by the server's worker when it loads the models; the main process says it and exits 2."""
    torch.manual_seed(0)
    wrong = save_head(RegionSpotHead(clip_dim=96, text_dim=64, ffn_dim=256, num_heads=4), tmp_path / "wrong.pt")
    argv = [*without(flags["model"], "--head"), "--head", str(wrong), "--port", str(free_port())]
    proc = subprocess.run(python_module("regionspot_pl.serve", *argv), capture_output=True, text=True,
                          env=environment(), timeout=600)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "could not be loaded" in errors[0] and "width 96" in errors[0], proc.stderr
