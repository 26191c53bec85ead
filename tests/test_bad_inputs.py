"""The bad-image suite end to end: unusable files mixed with good ones and with odd but usable
formats, through an image folder and through Parquet, in a whole (local-mode) training run.

The run must finish; every unusable file is named with its reason in decode_errors.json and
counted (two with identical bytes are two rows: counted and named twice); every usable odd
format is decoded into a training batch (a spy on the decode function records which rows).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from massl_ray.config import load_config
from massl_ray.train.trainer import train


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _enc(Image.fromarray(_noise(24, 40, 7)), "JPEG", exif=exif.tobytes())


def _palette_png() -> bytes:
    im = Image.fromarray(_noise(32, 32, 8)).convert("P", palette=Image.Palette.ADAPTIVE)
    return _enc(im, "PNG")


def _png16() -> bytes:
    arr = (np.random.default_rng(9).integers(0, 65536, (32, 32))).astype(np.uint16)
    return _enc(Image.fromarray(arr), "PNG")  # mode I;16


def _suite() -> tuple[dict[str, bytes], dict[str, bytes]]:
    good_jpeg = _enc(Image.fromarray(_noise(32, 32, 1)), "JPEG", quality=90)
    usable = {
        "cmyk.jpg": _enc(Image.fromarray(_noise(32, 32, 2)).convert("CMYK"), "JPEG"),
        "deep16.png": _png16(),
        "palette.png": _palette_png(),
        "rgba.png": _enc(Image.fromarray(np.dstack([_noise(32, 32, 3),
                                                   np.full((32, 32), 128, np.uint8)]), "RGBA"),
                         "PNG"),
        "tiny8x8.png": _enc(Image.fromarray(_noise(8, 8, 4)), "PNG"),
        "huge8000.jpg": _enc(Image.new("RGB", (8000, 8000), (30, 90, 200)), "JPEG", quality=50),
        "exif_rotated.jpg": _exif_rotated_jpeg(),
        "grey.png": _enc(Image.fromarray(_noise(32, 32, 5)[..., 0]), "PNG"),
    }
    for i in range(10):  # plain good ones
        usable[f"good{i}.jpg"] = _enc(Image.fromarray(_noise(32, 32, 10 + i)), "JPEG")
    unusable = {
        "zero_byte.jpg": b"",
        "zero_byte_again.jpg": b"",  # the same bytes as zero_byte.jpg: a second row all the same
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "truncated_again.jpg": good_jpeg[: len(good_jpeg) // 2],
        "random_bytes.jpg": np.random.default_rng(6).integers(0, 256, 3000, np.uint8).tobytes(),
        "text_file.jpg": b"this is a text file with a .jpg name\n" * 10,
    }
    return usable, unusable


def _overrides(tmp_path: Path, name: str, data: str) -> list[str]:
    o = {
        "model.arch": "vit_micro", "model.patch_size": 4, "model.depth": 1,
        "model.head_hidden_dim": 32, "model.head_out_dim": 16,
        "crops.global_size": 16, "crops.local_size": 8, "crops.num_local_crops": 2,
        "massl.memory_size": 64, "massl.block_size": 16,
        "optim.batch_size_per_worker": 4, "optim.epochs": 1,
        "data.train": data, "data.decode_batch_size": 5,
        "run.name": name, "run.storage_path": str(tmp_path), "run.log_every_steps": 1,
        "run.checkpoint_every_steps": 100, "run.final_knn": False, "run.num_workers": 0,
    }
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["folder", "parquet"])
def test_bad_image_suite_is_skipped_named_and_counted_and_odd_formats_are_used(
        tmp_path, layout, monkeypatch):
    import massl_ray.data.groups as order_mod

    usable, unusable = _suite()
    files = {**usable, **unusable}
    names = sorted(files)
    if layout == "folder":
        data = tmp_path / "imgs"
        data.mkdir()
        for n in names:
            (data / n).write_bytes(files[n])
    else:
        data = tmp_path / "mixed.parquet"
        pq.write_table(pa.table({"image": pa.array([files[n] for n in names], pa.binary())}),
                       data)

    def key(n: str) -> str:  # a file by its path; a Parquet row by file and row index
        return str(data / n) if layout == "folder" else f"{data}#{names.index(n)}"

    decoded: list[str] = []  # ids of the rows the training batches were made of
    real_make_views = order_mod.make_views

    def spy(images, ids, *a, **kw):
        out, bad = real_make_views(images, ids, *a, **kw)
        failed = {b[0] for b in bad}
        decoded.extend(i for i in ids if i not in failed)
        return out, bad

    monkeypatch.setattr(order_mod, "make_views", spy)
    res = train(load_config(None, _overrides(tmp_path, layout, str(data))), local=True)

    # 24 rows -> 6 steps of 4 (exact order: each step has its own 4 rows, and a step with
    # unusable rows repeats its decodable ones). Every row is visited once: the 18 usable ones
    # (the odd formats among them) were each decoded into a batch, the 6 unusable ones skipped.
    assert res["metrics"]["step"] == len(files) // 4
    assert sorted(decoded) == sorted(key(n) for n in usable)
    assert res["skipped_images"] == len(unusable)
    report = json.loads((tmp_path / layout / "decode_errors.json").read_text())
    assert report["skipped"] == len(unusable)
    named = report["rows"]
    assert sorted(named) == sorted(key(n) for n in unusable)  # the identical pairs: both named
    for n in unusable:
        assert isinstance(named[key(n)], str) and named[key(n)], f"no reason for {n}"


# ---- unreadable files and row groups: skipped, named and refilled like undecodable images ------

def _corrupt_page(path: Path, group: int) -> None:
    """Garbage over the first page header of row group ``group``'s image column chunk: the
    footer stays valid (the file opens), reading that row group fails."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(0)
    off = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[off:off + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _write_parquet(root: Path, junk: set) -> tuple[Path, Path]:
    """a.parquet: 4 rows (one row group); b.parquet: 28 rows in row groups of 4. ``junk``:
    (file, row) pairs written as undecodable bytes."""
    root.mkdir(exist_ok=True)
    out = []
    for name, n, seed in (("a.parquet", 4, 100), ("b.parquet", 28, 200)):
        imgs = [b"junk" if (name, i) in junk else
                _enc(Image.fromarray(_noise(12, 12, seed + i)), "PNG") for i in range(n)]
        pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                                 "label": pa.array(np.arange(n) % 3, pa.int64())}),
                       root / name, row_group_size=4)
        out.append(root / name)
    return out[0], out[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["file_removed", "dangling_link", "parquet_removed",
                                   "corrupt_page"])
def test_unreadable_files_and_row_groups_are_skipped_named_and_refilled_like_undecodable_rows(
        tmp_path, fault):
    """A file removed after the source was opened, an image path that became a dangling link
    (CI runs as root: chmod 000 would not deny a read), a Parquet file removed after opening,
    a corrupted page behind a valid footer: the training batches (rows and crops) are bit for
    bit those of the same data with these rows undecodable, at world size 1 and 2; the report
    names the file, or ``<file>#rg<i>`` once per row group, with the read error."""
    from massl_ray.config import CropConfig
    from massl_ray.data.groups import LocalFeed
    from massl_ray.data.multicrop import MultiCrop
    from massl_ray.data.sources import open_source
    from massl_ray.data.views import DecodeReport

    mc = MultiCrop(CropConfig(global_size=8, local_size=4, num_local_crops=1))

    def run(src, world):
        report = DecodeReport()
        feed = LocalFeed(src, mc, 3, 8, 4, report=report)
        ranks = [list(feed.batches(0, 0, r, world)) for r in range(world)]
        steps = [{k: np.concatenate([ranks[r][s][k] for r in range(world)])
                  for k in ranks[0][s]} for s in range(len(ranks[0]))]
        return steps, report.summary()["rows"]

    if fault in ("file_removed", "dangling_link"):
        root, outside = tmp_path / "imgs", tmp_path / "outside"
        root.mkdir()
        outside.mkdir()
        for i in range(32):
            (root / f"{i:02d}.png").write_bytes(_enc(Image.fromarray(_noise(12, 12, i)), "PNG"))
        x = root / "05.png"
        if fault == "dangling_link":  # a link to a file outside the folder
            target = outside / "05.png"
            target.write_bytes(x.read_bytes())
            x.unlink()
            x.symlink_to(target)
        else:
            target = x
        src = open_source(str(root))
        good = target.read_bytes()
        target.write_bytes(b"junk")
        expected, expected_named = run(src, 1)
        target.write_bytes(good)
        target.unlink()  # removed after opening; for the link: now dangling
        named_as = {str(x)}
    else:
        bad_rows = ({("a.parquet", i) for i in range(4)} if fault == "parquet_removed"
                    else {("b.parquet", i) for i in range(8, 12)})  # b's row group 2
        a, b = _write_parquet(tmp_path / "junk", bad_rows)
        expected, expected_named = run(open_source(str(tmp_path / "junk")), 1)
        assert len(expected_named) == 4  # four undecodable rows, each named
        a, b = _write_parquet(tmp_path / "junk", set())
        src = open_source(str(tmp_path / "junk"))
        if fault == "parquet_removed":
            a.unlink()
            named_as = {f"{a}#rg0"}
        else:
            _corrupt_page(b, 2)
            named_as = {f"{b}#rg2"}
    for world in (1, 2):
        got, named = run(src, world)
        assert len(got) == len(expected) == 4
        for s, (e, g) in enumerate(zip(expected, got)):
            assert e.keys() == g.keys()
            for k in e:
                assert np.array_equal(e[k], g[k]), f"world {world} step {s}: {k} differs"
        assert set(named) == named_as, named
        why = named[next(iter(named_as))]
        assert why.startswith("unreadable: ") and ("No such file" in why or "thrift" in why), why


def test_an_incomplete_decode_report_is_not_reported_as_all_images_decoded(tmp_path, caplog):
    """A decode report that restarted (``complete: false``) lists only the rows since: its
    count is a lower bound, never "all images decoded"."""
    import logging

    from massl_ray.train.trainer import _report_decode_errors

    log = logging.getLogger("massl_ray")
    log.addHandler(caplog.handler)  # the package's logger may not propagate (setup_logging)
    try:
        with caplog.at_level(logging.INFO, logger="massl_ray"):
            _report_decode_errors(tmp_path, {"skipped": 0, "rows": {}})
            assert "all images decoded" in caplog.text  # a complete report of none
            caplog.clear()
            partial = {"complete": False, "restarted": True, "note": "it restarted"}
            _report_decode_errors(tmp_path, {"skipped": 0, "rows": {}, **partial})
            assert "all images decoded" not in caplog.text
            assert "incomplete" in caplog.text and "lower bound" in caplog.text
            caplog.clear()
            _report_decode_errors(tmp_path, {"skipped": 1, "rows": {"x.jpg": "bad"}, **partial})
            assert "skipped at least 1 " in caplog.text and "incomplete" in caplog.text
    finally:
        log.removeHandler(caplog.handler)
    assert json.loads((tmp_path / "decode_errors.json").read_text())["complete"] is False


@pytest.mark.parametrize("kind", ["parquet", "folder"])
def test_an_object_stores_passing_error_is_raised_and_a_missing_key_is_skipped(kind):
    """A network or throttling error of an object store is not the data's fault: the read
    raises (the run restarts from its checkpoint) instead of skipping the rows for good; a
    missing key or a denied read is the data's, skipped and named."""
    from massl_ray.data.groups import Group, GroupRead, read_group

    class Store:  # pyarrow's S3 filesystem failing with the message it gives
        def __init__(self, message):
            self.message = message

        def open_input_file(self, path):
            raise OSError(self.message)

        open_input_stream = open_input_file

    def read(message):
        files = ("bucket/train.parquet",) if kind == "parquet" else ("bucket/a/1.jpg",)
        return read_group(GroupRead(kind, Store(message), files, Group(0, 0, 0, 1),
                                    label_column="label" if kind == "parquet" else None))

    for passing in ("When reading information for key 'train.parquet' in bucket 'bucket': AWS "
                    "Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, "
                    "Couldn't connect to server",
                    "AWS Error SLOW_DOWN during GetObject operation: Please reduce your rate"):
        with pytest.raises(OSError, match="AWS Error"):
            read(passing)
    for missing in ("AWS Error NO_SUCH_KEY during GetObject operation",
                    "AWS Error ACCESS_DENIED during GetObject operation: Access Denied"):
        out = read(missing)
        assert out["image"] == [b""] and list(out["unreadable"].values())[0].startswith(
            "unreadable: OSError: AWS Error"), out
