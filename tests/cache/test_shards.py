"""The shard reader: same samples as webdataset's own tar reader + np.load, zero-copy, clear errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from regionspot_pl.cache.shards import (
    AtomicShardWriter,
    ShardFormatError,
    encode_sample,
    iter_samples,
    list_shards,
    npy_view,
)


def _reference(shards) -> list[dict]:
    """Samples as webdataset's tarfile reader and np.load decode them (the slow, obvious way)."""
    out = []
    for raw in wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False):
        sample = {k[:-4]: np.load(io.BytesIO(v), allow_pickle=False) for k, v in raw.items() if k.endswith(".npy")}
        out.append({"__key__": raw["__key__"], "meta": json.loads(raw["json"]), **sample})
    return out


def test_reader_gives_what_webdataset_and_np_load_give(demo_shards):
    shards = list_shards(demo_shards["val"]) + list_shards(demo_shards["train"])[:3]
    ours, reference = list(iter_samples(shards)), _reference(shards)
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in reference] and len(ours) == 14 + 12
    for a, b in zip(ours, reference):
        assert a["meta"] == b["meta"]
        for name in ("sam", "boxes", "labels", "scores", "iou", "clip"):
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
            np.testing.assert_array_equal(a[name], b[name])


def test_clip_tokens_are_a_view_of_the_shard_bytes_and_per_box_arrays_are_writable(demo_shards):
    sample = next(iter_samples(list_shards(demo_shards["val"])[:1]))
    owner = sample["clip"]
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, bytes) and not sample["clip"].flags.writeable  # no copy made
    for name in ("sam", "boxes", "labels", "scores", "iou"):
        assert sample[name].flags.writeable and sample[name].flags.owndata


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        np.zeros((0, 256), np.float16),
        np.array([3, -1], np.int64),
        np.float32(2.5).reshape(()),
    ],
)
def test_npy_view_round_trips_what_np_save_writes(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    back = npy_view(buf.getvalue())
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_npy_view_reads_version_2_headers():
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.arange(5, dtype=np.float32), version=(2, 0))
    np.testing.assert_array_equal(npy_view(buf.getvalue()), np.arange(5, dtype=np.float32))


def test_npy_view_refuses_pickles_and_wrong_sizes():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects"):
        npy_view(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32))
    with pytest.raises(ValueError, match="data bytes for shape"):
        npy_view(buf.getvalue()[:-4])
    with pytest.raises(ValueError, match="magic"):
        npy_view(b"PK\x03\x04 a zip, not an npy")


def _one_shard(tmp_path, samples: int = 3):
    rng = np.random.default_rng(0)
    writer = AtomicShardWriter(tmp_path / "s-r000-000000.tar")
    for i in range(1, samples + 1):
        n = i + 1
        writer.write(
            encode_sample(
                i,
                rng.normal(size=(n, 256)),
                rng.uniform(0, 9, (n, 4)),
                np.arange(n),
                np.ones(n),
                rng.normal(size=(5, 8)),
                {"file_name": f"{i}.jpg"},
                iou=rng.uniform(-0.1, 1.1, n),
            )
        )
    return writer.commit({})


def test_corrupt_shards_are_reported_with_where_and_what_to_do(tmp_path):
    shard = _one_shard(tmp_path)
    data = bytearray(shard.read_bytes())
    assert len(list(iter_samples([shard]))) == 3

    flipped = tmp_path / "flipped.tar"
    second_header = 512 + ((int(data[124:136].strip(b"\0 "), 8) + 511) // 512) * 512
    data_flipped = bytearray(data)
    data_flipped[second_header + 3] ^= 0x01  # one bit of the second member's name
    flipped.write_bytes(data_flipped)
    with pytest.raises(ShardFormatError, match=f"byte {second_header}: tar header checksum mismatch.*re-extract"):
        list(iter_samples([flipped]))

    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFormatError, match="truncated"):
        list(iter_samples([truncated]))

    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:second_header])  # cut at a member boundary, as an interrupted copy can
    with pytest.raises(ShardFormatError, match=f"byte {second_header}: the shard ends without tar's end-of-archive"):
        list(iter_samples([cut]))

    not_tar = tmp_path / "not_tar.tar"
    not_tar.write_bytes(b"hello world " * 100)
    with pytest.raises(ShardFormatError, match="not a tar header"):
        list(iter_samples([not_tar]))


def _repack(shard, out, fmt, extra_dir=False, prefix=""):
    with tarfile.open(shard) as src, tarfile.open(out, "w", format=fmt) as dst:
        if extra_dir:
            info = tarfile.TarInfo(prefix.rstrip("/") or "somedir")
            info.type = tarfile.DIRTYPE
            dst.addfile(info)
        for m in src.getmembers():
            data = src.extractfile(m).read()
            m.name = prefix + m.name
            dst.addfile(m, io.BytesIO(data))
    return out


def test_ustar_from_other_writers_is_read_and_pax_headers_are_refused(tmp_path):
    shard = _one_shard(tmp_path)
    expected = [s["__key__"] for s in iter_samples([shard])]
    # a directory entry and a ustar name prefix (paths over 100 characters), as GNU tar writes them
    deep = "d" * 60 + "/" + "e" * 60 + "/"
    repacked = _repack(shard, tmp_path / "ustar.tar", tarfile.USTAR_FORMAT, extra_dir=True, prefix=deep)
    assert [s["__key__"] for s in iter_samples([repacked])] == [deep + k for k in expected]
    pax = _repack(shard, tmp_path / "pax.tar", tarfile.PAX_FORMAT, prefix="ü/")  # non-ASCII: a pax header
    with pytest.raises(ShardFormatError, match="pax/GNU extended tar header.*--format=ustar"):
        list(iter_samples([pax]))


def test_predicted_iou_round_trips_as_float32(tmp_path):
    """iou.npy holds SAM's predicted IoU as float32, values outside [0, 1] included."""
    iou = np.array([0.9871, 1.0312, -0.0417], dtype=np.float64)
    sample = encode_sample(
        5,
        np.zeros((3, 256)),
        np.tile([1.0, 2.0, 8.0, 9.0], (3, 1)),
        np.zeros(3),
        np.ones(3),
        np.zeros((5, 8)),
        {},
        iou=iou,
    )
    writer = AtomicShardWriter(tmp_path / "s-r000-000000.tar")
    writer.write(sample)
    shard = writer.commit({})
    (back,) = iter_samples([shard])
    assert back["iou"].dtype == np.float32 and back["iou"].shape == (3,)
    np.testing.assert_array_equal(back["iou"], iou.astype(np.float32))
    assert np.load(io.BytesIO(sample["iou.npy"]), allow_pickle=False).dtype == np.float32


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (
            None,
            r"sample 1 \(.*\.tar\) lacks member iou\.npy: it is not a shard of this version's cache format; "
            r"re-extract it with `python -m regionspot_pl\.extract`$",
        ),
        (np.zeros(3, np.float32), r"^sample 1: per-box arrays disagree: .* iou \(3,\)$"),
        (np.zeros((2, 1), np.float32), r"^sample 1: iou\.npy is float32 \(2, 1\), expected float32 with 1 dims$"),
        (np.zeros(2, np.float16), r"^sample 1: iou\.npy is float16 \(2,\), expected float32 with 1 dims$"),
    ],
    ids=["missing", "one too many", "two dims", "float16"],
)
def test_a_sample_without_a_fitting_iou_member_is_refused(tmp_path, member, message):
    """A shard of the older format (no iou.npy) or with a malformed one: one error naming the member."""
    sample = encode_sample(
        1,
        np.zeros((2, 256)),
        np.tile([1.0, 2.0, 8.0, 9.0], (2, 1)),
        np.zeros(2),
        np.ones(2),
        np.zeros((5, 8)),
        {},
        iou=np.ones(2),
    )
    if member is None:
        del sample["iou.npy"]
    else:
        sample["iou.npy"] = _npy(member)
    writer = AtomicShardWriter(tmp_path / "s-r000-000000.tar")
    writer.write(sample)
    shard = writer.commit({})
    with pytest.raises(ShardFormatError, match=message):
        list(iter_samples([shard]))
