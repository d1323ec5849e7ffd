"""Predict on your own images: ``python train.py predict --ckpt_path X --predict.images PATH``.

    select_images(spec)     PATH: a file, a folder (its .png/.jpg/.jpeg files, subfolders included, sorted) or a
                            glob pattern (``'photos/*.jpg'``, ``'photos/**/*.png'``)
    read_images(paths)      uint8 (N, 3, 32, 32) of those that can be used; the others, each with a one-line reason
    read_image(path)        one image as the model takes it, uint8 RGB (3, 32, 32); BadDataError if it cannot be
    load(spec, max_pixels)  ``--predict.images`` and ``--predict.max_pixels``: the images, the skipped files listed
    DecoderProcess          the isolated decoder seen from the run: one worker process, fed one path at a time,
                            replaced by a fresh one when it dies or hangs
    ImageFiles              a LightningDataModule whose predict batches are these raw images (no CIFAR-10 needed:
                            the model normalizes them with its stored statistics, HandgradClassifier.predict_step)

The files are untrusted: they are decoded with Pillow in a worker process of their own
(:mod:`handgrad.data.image_decoder`, which says how the pixels are made: header checked against the pixel limit
before decoding, RGB, 32x32 bilinear antialiased, EXIF orientation). A file the decoder refuses, or on which it
crashes (a signal) or hangs (over :data:`TIMEOUT_S`), is skipped with one line; a fresh worker goes on with the
rest. Memory stays bounded: the worker holds one image at a time, the run only the 32x32 results.
"""

from __future__ import annotations

import glob
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor

from handgrad.data import image_decoder
from handgrad.data.cifar_io import rgb_tensor
from handgrad.data.datamodule import TensorBatches
from handgrad.data.image_decoder import HEADER, IMAGE, MAX_PIXELS, READY, SIZE
from handgrad.runtime.errors import BadDataError, ConfigError, SetupError

EXTENSIONS = (".png", ".jpg", ".jpeg")  # what a folder contributes
WORKER = (sys.executable, image_decoder.__file__)  # the decoder's process, run by its path: Pillow only, no torch
TIMEOUT_S = 60.0  # for one file (the largest image under the default pixel limit decodes in seconds)
PIXEL_BYTES = SIZE[0] * SIZE[1] * 3


def select_images(spec: str) -> list[Path]:
    """The files ``spec`` names: itself, a folder's PNG/JPEG files, or a glob's matches. Raises ConfigError
    when it names none."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                       and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        what = f"folder {spec} holds no {'/'.join(EXTENSIONS)} files" if path.is_dir() else \
            f"{spec} is no file, folder or glob pattern that matches a file"
        raise ConfigError(f"--predict.images: {what}; give a PNG/JPEG file, a folder of them or a pattern such "
                          f"as 'photos/*.jpg'")
    return files


class WorkerGone(Exception):
    """The worker process ended (its pipe closed)."""


class DecoderProcess:
    """The isolated decoder: a worker process (``command`` MAX_PIXELS, :func:`handgrad.data.image_decoder.main`)
    fed one path at a time. A worker that dies on a file (a signal, an exit) or takes over ``timeout_s`` on it is
    replaced by a fresh one for the next file. Its stderr goes to a temporary file, read only when it cannot start."""

    def __init__(self, max_pixels: int = MAX_PIXELS, command: Sequence[str] = WORKER, timeout_s: float = TIMEOUT_S):
        self.argv = [*command, str(max_pixels)]
        self.timeout_s = timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.stderr = tempfile.TemporaryFile()

    def __enter__(self) -> "DecoderProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.stderr.close()

    def read(self, path: Union[str, Path]) -> Union[bytes, str]:
        """The file's 32x32 RGB bytes (row-major, height x width x 3), or why it cannot be used (one line)."""
        request = os.fsencode(path)
        try:
            self.send(HEADER.pack(len(request)) + request)
            status, payload = self.receive()
        except TimeoutError:
            self.stop(kill=True)
            return f"the decoder took over {self.timeout_s:g} s on it (stopped)"
        except WorkerGone:
            return self.ended()
        if status == IMAGE and len(payload) != PIXEL_BYTES:
            return f"the decoder returned {len(payload)} bytes instead of {PIXEL_BYTES}"
        return bytes(payload) if status == IMAGE else " ".join(payload.decode(errors="replace").split())

    def start(self) -> None:
        """A fresh worker, ready (it has imported Pillow); SetupError if it cannot start."""
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     bufsize=0)
        try:
            ready = self.read_exact(len(READY), time.monotonic() + self.timeout_s)
        except (WorkerGone, TimeoutError):
            ready = b""
        if ready != READY:
            self.stop(kill=True)
            self.stderr.seek(0)
            lines = self.stderr.read().decode(errors="replace").strip().splitlines() or ["no message"]
            raise SetupError(f"the image decoder process ({' '.join(self.argv)}) did not start: {lines[-1]}")

    def send(self, data: bytes) -> None:
        """Write a request; a worker that ended while idle (killed from outside) is replaced once."""
        for attempt in (1, 2):
            if self.proc is None:
                self.start()
            try:
                self.proc.stdin.write(data)
                return
            except (BrokenPipeError, ConnectionResetError):
                self.stop()
                if attempt == 2:
                    raise WorkerGone() from None

    def receive(self) -> tuple[bytes, bytearray]:
        """(status, payload) of one reply; TimeoutError after timeout_s, WorkerGone if the worker ends first."""
        deadline = time.monotonic() + self.timeout_s
        head = self.read_exact(1 + HEADER.size, deadline)
        return bytes(head[:1]), self.read_exact(HEADER.unpack(head[1:])[0], deadline)

    def read_exact(self, n: int, deadline: float) -> bytearray:
        fd, data = self.proc.stdout.fileno(), bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError()
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise WorkerGone()
            data += chunk
        return data

    def ended(self) -> str:
        """Why the worker ended on the file it was given (the next file gets a fresh one)."""
        code = self.stop()
        if code is None:
            return "the decoder process ended twice before it could be given the file"
        return f"the decoder crashed on it (signal {-code})" if code < 0 else \
            f"the decoder stopped on it (exit code {code})"

    def stop(self, kill: bool = False) -> Optional[int]:
        """End the worker (closing its stdin ends it; ``kill``, or 5 s without ending: SIGKILL); its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        if kill:
            proc.kill()
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def read_images(paths: Sequence[Path], max_pixels: int = MAX_PIXELS, worker: Sequence[str] = WORKER,
                timeout_s: float = TIMEOUT_S) -> tuple[Tensor, list[Path], list[tuple[Path, str]]]:
    """(uint8 images (N, 3, 32, 32), their files, [(skipped file, why: one line)]): decoded one at a time in the
    isolated decoder (``worker``: its command, to which the pixel limit is appended)."""
    pixels, kept, skipped = bytearray(), [], []
    with DecoderProcess(max_pixels, worker, timeout_s) as decoder:
        for p in paths:
            got = decoder.read(p)
            if isinstance(got, str):
                skipped.append((p, got))
            else:
                pixels += got
                kept.append(p)
    return rgb_tensor(pixels), kept, skipped


def read_image(path, max_pixels: int = MAX_PIXELS) -> Tensor:
    """The image at ``path`` as uint8 RGB (3, 32, 32), as ``predict --predict.images`` reads it; BadDataError (one
    line) when it cannot be used."""
    x, _, skipped = read_images([Path(path)], max_pixels)
    if skipped:
        raise BadDataError(f"{path}: {skipped[0][1]}")
    return x[0]


def load(spec: str, max_pixels: int = MAX_PIXELS) -> tuple[Tensor, list[Path]]:
    """Select and read the images of ``--predict.images``, refusing those over ``--predict.max_pixels``; list the
    skipped ones, one line each. Raises ConfigError for a bad limit, or when no image is left."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"--predict.max_pixels must be a positive number of pixels (width x height), got "
                          f"{max_pixels!r}; the default is {MAX_PIXELS}")
    x, files, skipped = read_images(select_images(spec), max_pixels)
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) of --predict.images:")
        for p, why in skipped:
            print(f"  {p}: {why}")
    if not files:
        raise ConfigError(f"--predict.images {spec}: none of its {len(skipped)} file(s) could be read as an image")
    return x, files


class ImageFiles(L.LightningDataModule):
    """Raw uint8 images as the predict set: batches (images, index); the model normalizes them."""

    dims = (3, *SIZE)

    def __init__(self, images: Tensor, files: Sequence[Path], class_names: Sequence[str], batch_size: int = 256):
        super().__init__()
        self.images, self.files, self.class_names, self.batch_size = images, list(files), list(class_names), batch_size

    def predict_dataloader(self) -> TensorBatches:
        return TensorBatches(self.images, torch.arange(len(self.images)), self.batch_size)
