"""Hostile files for ``predict --predict.images``: the run survives them, each is skipped with one line.

Every file is generated here (no binary fixture): a crafted 167-byte PNG that declares 30000x30000 and carries one
row of IDAT (torchvision 0.29's decode_image segfaulted on it), a small JPEG whose SOF0 declares 60000x60000 (its like
took 11.3 GB to decode), the header of a 30000x30000 PNG bomb, a truncated PNG, a text file named .png, and good
images. A decoder crash is simulated by a test-only worker command that kills itself with SIGSEGV on a given file.

References: the files' declared sizes, Pillow's own decode of the good images, the worker's peak memory (VmHWM).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from handgrad.data import image_decoder
from handgrad.data.image_decoder import MAX_PIXELS
from handgrad.data.images import read_image, read_images
from handgrad.runtime.errors import BadDataError, SetupError

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
DATA_SRC = REPO / "src" / "handgrad" / "data"
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
LIMIT = f"over the limit of {MAX_PIXELS:,} (--predict.max_pixels): refused before decoding"


# ------------------------------------------------------------------ the hostile files

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: int) -> bytes:
    """An 8-bit RGB PNG that declares width x height and carries ``rows`` rows of black pixels (correct CRCs)."""
    raw = b"".join(b"\0" + bytes(3 * width) for _ in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def jpeg_bomb(side: int = 60000) -> bytes:
    """A valid 8x8 JPEG whose SOF0 height and width fields say side x side."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def random_image(shape, seed: int = 0, mode=None) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def write_hostile(folder: Path) -> dict:
    """The hostile files and one good image in ``folder``: {file name: what the skip line must say}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "crafted.png").write_bytes(png(30000, 30000, 1))
    (folder / "bomb.jpg").write_bytes(jpeg_bomb())
    (folder / "bomb.png").write_bytes(png(30000, 30000, 64))  # the bomb's header: it is refused before its data
    good = io.BytesIO()
    random_image((64, 64, 3)).save(good, "PNG")
    (folder / "truncated.png").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
    (folder / "notes.png").write_text("not an image\n")
    random_image((30, 40, 3), seed=1).save(folder / "good.png")
    assert (folder / "crafted.png").stat().st_size == 167
    return {"crafted.png": f"30000x30000 = 900,000,000 pixels, {LIMIT}",
            "bomb.jpg": f"60000x60000 = 3,600,000,000 pixels, {LIMIT}",
            "bomb.png": f"30000x30000 = 900,000,000 pixels, {LIMIT}",
            "truncated.png": "image file is truncated",
            "notes.png": "not a PNG or JPEG image"}


def test_each_hostile_file_is_skipped_with_one_line(tmp_path):
    reasons = write_hostile(tmp_path / "photos")
    x, kept, skipped = read_images(sorted((tmp_path / "photos").iterdir()))
    assert [p.name for p in kept] == ["good.png"] and x.shape == (1, 3, 32, 32) and x.dtype == torch.uint8
    assert {p.name: why for p, why in skipped} == reasons


# ------------------------------------------------------------------ the worker: crashes, hangs, memory

WRAPPED_WORKER = """
import os, signal, sys, time
sys.path.insert(0, {data!r})
import image_decoder
real = image_decoder.decode
def decode(path, max_pixels):
    name = os.path.basename(path)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hang"):
        time.sleep(600)
    return real(path, max_pixels)
image_decoder.decode = decode
try:
    image_decoder.main(sys.argv)
finally:
    with open(os.path.join({record!r}, str(os.getpid())), "w") as f:
        f.write(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def wrapped_worker(record: Path) -> list[str]:
    """A test-only worker command: the real worker, which kills itself with SIGSEGV on a file named crash*, sleeps
    on hang*, and at its end writes its peak memory (VmHWM) into ``record``/<pid>."""
    record.mkdir(exist_ok=True)
    return [sys.executable, "-c", WRAPPED_WORKER.format(data=str(DATA_SRC), record=str(record))]


def peak_kib(record: Path) -> list[int]:
    return [int(p.read_text().split()[1]) for p in sorted(record.iterdir())]


def test_a_decoder_crash_skips_its_file_and_a_fresh_worker_goes_on(tmp_path):
    names = ["a.png", "crash.png", "b.png", "crash2.png", "c.png"]
    for i, name in enumerate(names):
        random_image((20 + i, 24, 3), seed=i).save(tmp_path / name)
    paths = [tmp_path / n for n in names]
    x, kept, skipped = read_images(paths, worker=wrapped_worker(tmp_path / "record"))
    assert [p.name for p in kept] == ["a.png", "b.png", "c.png"]
    assert skipped == [(tmp_path / "crash.png", f"the decoder crashed on it (signal {int(signal.SIGSEGV)})"),
                       (tmp_path / "crash2.png", f"the decoder crashed on it (signal {int(signal.SIGSEGV)})")]
    assert torch.equal(x, read_images([tmp_path / n for n in ("a.png", "b.png", "c.png")])[0])
    assert len(peak_kib(tmp_path / "record")) == 1  # only the last worker ended by itself; the crashed ones died


def test_a_hanging_decoder_is_stopped_and_the_next_file_read(tmp_path):
    for name in ("hang.png", "after.png"):
        random_image((32, 32, 3)).save(tmp_path / name)
    x, kept, skipped = read_images([tmp_path / "hang.png", tmp_path / "after.png"], timeout_s=2,
                                   worker=wrapped_worker(tmp_path / "record"))
    assert [p.name for p in kept] == ["after.png"]
    assert skipped == [(tmp_path / "hang.png", "the decoder took over 2 s on it (stopped)")]


def test_bombs_are_refused_in_bounded_memory(tmp_path):
    """The worker's peak memory over the bombs, the crafted PNG and the rest stays small: nothing is decoded."""
    write_hostile(tmp_path / "photos")
    files = sorted((tmp_path / "photos").iterdir()) * 3
    before = Path("/proc/self/status").read_text()
    x, kept, skipped = read_images(files, worker=wrapped_worker(tmp_path / "record"))
    assert len(kept) == 3 and len(skipped) == 15
    (peak,) = peak_kib(tmp_path / "record")
    print(f"decoder worker's peak RSS over {len(files)} hostile files: {peak / 1024:.1f} MiB")
    assert peak < 500 * 1024
    rss = [int(line.split()[1]) for text in (before, Path("/proc/self/status").read_text())
           for line in text.splitlines() if line.startswith("VmRSS")]
    assert rss[1] - rss[0] < 50 * 1024  # the run itself holds the 32x32 results only


def test_a_worker_that_cannot_start_is_one_error_line(tmp_path):
    random_image((32, 32, 3)).save(tmp_path / "a.png")
    with pytest.raises(SetupError, match=r"^the image decoder process \(.*\) did not start: no Pillow here$"):
        read_images([tmp_path / "a.png"], worker=[sys.executable, "-c", "import sys; sys.exit('no Pillow here')"])


# ------------------------------------------------------------------ the pixels

def reference(img: Image.Image) -> torch.Tensor:
    """The documented conversion (handgrad.data.image_decoder), done here with Pillow in this process."""
    img = ImageOps.exif_transpose(img).convert("RGB").resize((32, 32), Image.BILINEAR, reducing_gap=None)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_modes_become_rgb_32x32(tmp_path, mode):
    img = random_image((45, 70, 3)).convert(mode)
    img.save(tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), reference(Image.open(tmp_path / "a.png")))


def test_16_bit_grayscale_keeps_its_high_byte(tmp_path):
    values = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    assert torch.equal(read_image(tmp_path / "a.png"), torch.from_numpy((values >> 8).astype(np.uint8)).expand(3, -1, -1))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), "black")
    img.paste((255, 255, 255), (0, 0, 32, 32))  # the left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "a.jpg", exif=exif.tobytes(), quality=95)
    x = read_image(tmp_path / "a.jpg").int()
    assert x[:, :12].float().mean() > 200 and x[:, -12:].float().mean() < 50  # the white half is now on top
    assert torch.equal(x, reference(Image.open(tmp_path / "a.jpg")).int())


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    """Image.draft: a 2048x1536 JPEG is decoded at 1/8 (256x192) before the resize; the result is the full decode's
    within JPEG's own noise."""
    x, y = np.meshgrid(np.linspace(0, 255, 2048), np.linspace(0, 255, 1536))
    smooth = np.stack([x, y, np.full_like(x, 99)], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    with Image.open(tmp_path / "a.jpg") as img:
        img.draft("RGB", image_decoder.DRAFT)
        assert img.size == (256, 192)
    diff = (read_image(tmp_path / "a.jpg").int() - reference(Image.open(tmp_path / "a.jpg")).int()).abs()
    assert diff.max() <= 3


def test_read_image_raises_one_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bomb())
    with pytest.raises(BadDataError, match=r"a\.jpg: 60000x60000 = 3,600,000,000 pixels, over the limit"):
        read_image(tmp_path / "a.jpg")


# ------------------------------------------------------------------ predict on the command line

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a 3-class model, fitted for one epoch on generated images."""
    root = tmp_path_factory.mktemp("fit")
    write_image_folder(root / "cifar", classes=("cat", "ship", "bird"))
    cli = train.main(["fit", "--data.data_dir", str(root / "cifar"), "--data.classes", "[cat, ship, bird]",
                      "--data.val_fraction", "0.25", "--model.sizes", "[3072, 8, 3]", "--trainer.max_epochs", "1",
                      "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(root), *QUIET])
    return Path(cli.trainer.checkpoint_callbacks[0].best_model_path)


def skip_lines(out: str) -> dict:
    """{file name: reason} of the printed skip list; every line of it is one file."""
    lines = out.split("unreadable file(s) of --predict.images:\n")[1].splitlines()
    listed = [line for line in lines if line.startswith("  ")]
    assert lines[:len(listed)] == listed  # one line each, nothing between them
    return {Path(line.strip().split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in listed}


def test_predict_on_a_hostile_folder_exits_0(checkpoint, tmp_path):
    """`python train.py predict` in a process of its own: it ends with exit code 0, lists exactly the bad files (one
    line each, no stack frames) and predicts the good one."""
    reasons = write_hostile(tmp_path / "photos")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "predict", "--ckpt_path", str(checkpoint),
                          "--predict.images", str(tmp_path / "photos"), "--trainer.default_root_dir", str(tmp_path),
                          *QUIET], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"skipped {len(reasons)} unreadable file(s) of --predict.images:" in run.stdout
    assert skip_lines(run.stdout) == reasons
    assert "Traceback" not in run.stderr and ".cpp" not in run.stdout + run.stderr
    (csv_file,) = tmp_path.glob("lightning_logs/version_*/predictions.csv")
    with open(csv_file, newline="") as f:
        assert [Path(r["file"]).name for r in csv.DictReader(f)] == ["good.png"]


def test_max_pixels_refuses_images_over_it(checkpoint, tmp_path, capsys):
    random_image((48, 64, 3)).save(tmp_path / "big.png")  # 3072 pixels
    random_image((8, 8, 3)).save(tmp_path / "tiny.png")  # 64 pixels
    pred = train.main(["predict", "--ckpt_path", str(checkpoint), "--predict.images", str(tmp_path),
                       "--predict.max_pixels", "100", "--trainer.default_root_dir", str(tmp_path), *QUIET])
    out = capsys.readouterr().out
    assert skip_lines(out) == {"big.png": "64x48 = 3,072 pixels, over the limit of 100 (--predict.max_pixels): "
                                          "refused before decoding"}
    assert [Path(f).name for f in pred.datamodule.files] == ["tiny.png"]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_pixels_must_be_positive(checkpoint, tmp_path, capsys, value):
    random_image((8, 8, 3)).save(tmp_path / "tiny.png")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["predict", "--ckpt_path", str(checkpoint), "--predict.images", str(tmp_path),
                    "--predict.max_pixels", value, "--trainer.default_root_dir", str(tmp_path), *QUIET])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: --predict.max_pixels must be a positive number")
    assert len(err.strip().splitlines()) == 1
