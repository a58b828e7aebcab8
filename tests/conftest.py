"""Shared fixtures, each built once per test session: ``tiny_backbones`` (random tiny SAM + CLIP in
the official formats), ``tiny_head`` and ``predictor`` (an untrained head that fits them, and a
Predictor on both), ``demo_data`` and ``demo_shards`` (a small scene set and its extracted shards)."""

from __future__ import annotations

from pathlib import Path

import lightning  # noqa: F401
import pytest
import torch

from regionspot_pl.backbones.tiny import write_tiny_backbones

# Lightning adds a handler writing to sys.stderr when first imported. The commands import it only
# when they run, which in a test is while pytest captures stderr: the handler would keep that test's
# stream after it is closed. Imported here, before any test, it writes to the real stderr.


# The tests' tiny SAM takes a 256 px input (the demo's, `python -m regionspot_pl.tiny`'s, 512):
# a quarter of the image tokens, so a quarter of the mask decoder's work for every prompt.
TESTS_SAM_SIZE = 256


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"sam_checkpoint": .../sam_tiny.pth, "clip_dir": .../clip_tiny, "siglip_dir": .../siglip_tiny,
    "metaclip2_dir": .../metaclip2_tiny, "sam2_checkpoint": .../sam2.1_hiera_tiny_random.pt,
    "sam2_config": .../sam2.1_hiera_tiny_random.yaml} for seed 0 (``write_tiny_backbones``)."""
    return write_tiny_backbones(tmp_path_factory.mktemp("tiny_backbones"), seed=0, sam_image_size=TESTS_SAM_SIZE)


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained head sized to the tiny CLIP (seed 0), saved both ways:
    {"file": .../head.pt, "folder": .../head (model folder), "text_cache": .../text.h5 (empty)}."""
    from regionspot_pl.model import RegionSpotHead, save_head, save_pretrained

    root = tmp_path_factory.mktemp("tiny_head")
    torch.manual_seed(0)
    head = RegionSpotHead(clip_dim=128, text_dim=64, ffn_dim=256, num_heads=4).eval()
    return {
        "file": save_head(head, root / "head.pt"),
        "folder": Path(save_pretrained(head, root / "head")),
        "text_cache": root / "text.h5",
    }


@pytest.fixture(scope="session")
def predictor(tiny_backbones, tiny_head):
    """One Predictor on the tiny backbones and ``tiny_head`` for the whole session; a test sets
    its own image (``set_image``) before it predicts."""
    from regionspot_pl import Predictor

    return Predictor.from_pretrained(
        head=tiny_head["file"], sam_type="tiny", sam_checkpoint=tiny_backbones["sam_checkpoint"],
        clip_model=tiny_backbones["clip_dir"], text_cache=tiny_head["text_cache"],
    )  # fmt: skip


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small generated scene set (24 train, 14 val images), LVIS-style annotations."""
    from regionspot_pl.demo.scenes import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("demo_data"), num_train=24, num_val=14, seed=0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_data, tiny_backbones) -> dict[str, Path]:
    """Train and val shards of ``demo_data`` extracted with the tiny backbones (4 images a shard)."""
    from regionspot_pl.extract.run import ExtractConfig, run_extraction

    root = tmp_path_factory.mktemp("demo_shards")
    for split in ("train", "val"):
        run_extraction(
            ExtractConfig(
                images=str(demo_data[f"{split}_images"]),
                annotations=str(demo_data[f"{split}_json"]),
                out=str(root / split),
                sam_type="tiny",
                sam_checkpoint=str(tiny_backbones["sam_checkpoint"]),
                clip_model=str(tiny_backbones["clip_dir"]),
                dataset=f"demo_{split}",
                shard_size=4,
                workers=0,
                text_cache=str(root / "text.h5"),
            )
        )
    return {"train": root / "train", "val": root / "val", "text_cache": root / "text.h5"}


@pytest.fixture
def cli_error(capsys: pytest.CaptureFixture):
    """``cli_error(main, argv, *fragments)``: runs a command's ``main(argv)`` in process and checks
    the bad-input contract: exit code 2, exactly one ``error:`` line on stderr, no traceback, and
    each fragment in that line. Returns the line."""

    def check(main, argv: list[str], *fragments: str) -> str:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, f"exit code {code}, stderr:\n{err}"
        assert "Traceback" not in err, err
        assert len(errors) == 1, f"expected one error: line, stderr:\n{err}"
        for fragment in fragments:
            assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
        return errors[0]

    return check


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files that hold a test marked slow run first, each file's tests together and in order (their
    module fixtures are built once): with ``-n 2 --dist worksteal`` the long end-to-end runs then
    start at once, and an idle worker takes the short tests queued behind them, instead of one long
    test running alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
