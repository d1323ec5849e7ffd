"""Getting CIFAR-10 into data_dir: use what is there, else extract a local archive, else download it (torchvision).

Several processes may prepare one data_dir at once (two first runs, the ranks of a sweep): one extracts or downloads
while holding handgrad.runtime.locks, the others wait and then use its result. Archives are extracted, and downloads
made, into a temp folder named after the writer (host and PID), whose top-level entries are renamed into data_dir when
complete: no other process ever sees a partial tree, and the debris of a killed writer is removed by the next run.
Long work is announced with log lines on rank 0 (Lightning's logger, INFO).
"""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
import time
import urllib.error
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from handgrad.runtime import disk, locks
from handgrad.data.cifar_io import (CACHE_DIR, CIFAR10_TGZ, PICKLE_DIR, Source, check_folder, find_source,
                               how_to_supply, no_data)
from handgrad.runtime.errors import BadDataError, DataNotFoundError

CIFAR10_URL, CIFAR10_TGZ_MD5 = CIFAR10.url, CIFAR10.tgz_md5
DOWNLOAD_BYTES = 350_000_000  # the 170 MB archive and the 180 MB it extracts to
DOWNLOAD_TIMEOUT_S = 30  # seconds without an answer before the download counts as failed
FOLDER_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
EXTRACT_PROGRESS_STEPS = 4  # log lines while extracting a folder archive: at 25%, 50%, 75% of its bytes


def prepare(data_dir: Path, download: bool) -> Source:
    """Make data_dir hold a source: use what is there, else extract a local archive, else download (torchvision).

    Nothing already on disk is overwritten: archives are extracted only into names that do not exist yet. A missing
    data_dir is created only by a download that succeeds: a failed one leaves no folder behind. Safe when several
    processes prepare one data_dir at once: one extracts or downloads (holding handgrad.runtime.locks), the others then use its
    result. Removes what interrupted runs (dead processes) left behind.
    """
    check_folder(data_dir)
    if (source := find_source(data_dir)) is not None:
        locks.remove_debris(data_dir, data_dir / CACHE_DIR)
        return source
    if not data_dir.is_dir() and not download:
        raise DataNotFoundError(f"{no_data(data_dir)} and download=False. " + how_to_supply(data_dir))
    created = missing_folders(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataNotFoundError(f"{no_data(data_dir)}, and it cannot be created ({e}). "
                                + how_to_supply(data_dir)) from None
    try:
        with locks.locked(data_dir):
            locks.remove_debris(data_dir, data_dir / CACHE_DIR)
            return _prepare_locked(data_dir, download, bool(created))
    except BaseException:
        remove_empty_folders(created)
        raise


def _prepare_locked(data_dir: Path, download: bool, created: bool) -> Source:
    if (source := find_source(data_dir)) is not None:  # another process prepared it while this one waited
        return source
    tgz = data_dir / CIFAR10_TGZ
    if tgz.is_file():
        if not check_integrity(str(tgz), CIFAR10_TGZ_MD5):
            raise BadDataError(f"{tgz} fails its md5 check (expected {CIFAR10_TGZ_MD5}): the file is incomplete or "
                               f"corrupt. Replace it with a good copy, or move it away to download again.")
        if (source := _extract(tgz, data_dir, "pickle")) is not None:
            return source
    for archive in sorted(data_dir.iterdir()):
        if archive.name.endswith(FOLDER_ARCHIVE_SUFFIXES) and archive.is_file():
            if (source := _extract(archive, data_dir, "folder")) is not None:
                return source
    if not download:
        raise DataNotFoundError(f"{no_data(data_dir)} and download=False. " + how_to_supply(data_dir))
    return _download(data_dir, created)


def _download(data_dir: Path, created: bool) -> Source:
    """Download and extract the official archive with torchvision into a temp folder, then move it into data_dir."""
    tmp, timeout = None, socket.getdefaulttimeout()
    try:
        tmp = locks.temp_dir(data_dir, "download")
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled network fails in seconds, not minutes
        download_and_extract_archive(CIFAR10_URL, str(tmp), filename=CIFAR10_TGZ, md5=CIFAR10_TGZ_MD5)
        for name in (PICKLE_DIR, CIFAR10_TGZ):
            (tmp / name).rename(data_dir / name)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # our own partial download, nothing of the user's
        if disk.is_disk_full(e):
            raise DataNotFoundError(disk.disk_full(data_dir, f"downloading {CIFAR10_URL}", DOWNLOAD_BYTES)
                                    + "; free some space there, or pass --data.data_dir on another disk.") from None
        typo = f"The folder {data_dir.absolute()} did not exist (a typo in --data.data_dir?). " if created else ""
        raise DataNotFoundError(f"Could not download CIFAR-10 from {CIFAR10_URL} ({type(e).__name__}: {e}). {typo}"
                                f"Without network: " + how_to_supply(data_dir)) from None
    finally:
        socket.setdefaulttimeout(timeout)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return find_source(data_dir)


def _extract(archive: Path, data_dir: Path, kind: str) -> Source | None:
    """Extract a tar holding a source of `kind` into a temp folder beside it, then rename its top-level entries into
    data_dir (never over existing names). None when the archive holds something else: it is left alone."""
    try:
        tmp = locks.temp_dir(data_dir, "extract")
    except OSError as e:
        if disk.is_disk_full(e):
            raise DataNotFoundError(_disk_full(archive, data_dir, None)) from None
        raise DataNotFoundError(f"Cannot extract {archive} into {data_dir} ({e}). Link it into a writable folder "
                                f"and pass that: mkdir -p data && ln -s {archive.absolute()} data/ (then "
                                f"--data.data_dir data).") from e
    try:
        rank_zero_info(f"extracting {archive} into {data_dir} (once)...")
        start = time.perf_counter()
        try:
            with open(archive, "rb") as raw, tarfile.open(fileobj=raw) as tar:
                try:
                    tar.extractall(tmp, members=_members_with_progress(tar, raw, archive.stat().st_size),
                                   filter=_data_filter)
                except OSError as e:
                    if not disk.is_disk_full(e):
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # give the space back before measuring it
                    raise DataNotFoundError(_disk_full(archive, data_dir, _unpacked_size(tar, data_dir))) from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadDataError(f"{archive} cannot be extracted ({e}); replace it with a good copy or remove it.") from e
        found = find_source(tmp)
        if found is None or found.kind != kind:
            return None
        entries = sorted(tmp.iterdir(), key=lambda e: e.name == "data_batch_1")  # the name find_source looks for last
        if clash := [e.name for e in entries if (data_dir / e.name).exists()]:
            raise BadDataError(f"{archive} would extract over existing {clash} in {data_dir}, which is not a complete "
                               f"CIFAR-10 source; fix or move {clash} away.")
        for e in entries:
            e.rename(data_dir / e.name)
        rank_zero_info(f"extracted {archive.name} in {time.perf_counter() - start:.0f} s")
        return find_source(data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_full(archive: Path, data_dir: Path, needed: int | None) -> str:
    return (disk.disk_full(data_dir, f"extracting {archive.name}", needed) + "; free some space there, or "
            "extract the archive on another disk and pass --data.data_dir pointing there.")


def _unpacked_size(tar: tarfile.TarFile, data_dir: Path) -> int | None:
    """The disk space the whole archive takes once extracted (each file rounded up to the block size), read from its
    member headers (the compressed stream is read to its end, writing nothing); None when that fails."""
    try:
        block = os.statvfs(data_dir).f_frsize or 4096
        return sum(-(-m.size // block) * block if m.isfile() else block for m in tar.getmembers())
    except (tarfile.TarError, OSError, EOFError):
        return None


def _data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (no path out of the folder, no link out, no device, no set-uid), and no absolute name
    either: the data filter would strip its leading "/" and extract it inside, where it would be stray."""
    if member.name.startswith("/") or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _members_with_progress(tar: tarfile.TarFile, raw, size: int):
    """The archive's members, in order, logging how far through the (compressed) file the reading is at every
    1/EXTRACT_PROGRESS_STEPS of it: a long extraction shows that it is moving."""
    step = 1
    for n, member in enumerate(tar, start=1):
        if step < EXTRACT_PROGRESS_STEPS and raw.tell() >= size * step / EXTRACT_PROGRESS_STEPS:
            rank_zero_info(f"  extracting: {100 * step // EXTRACT_PROGRESS_STEPS}% ({n} files)")
            step += 1
        yield member


def missing_folders(data_dir: Path) -> list[Path]:
    """data_dir and those of its parents that do not exist, deepest first: what `mkdir -p data_dir` would create."""
    missing = []
    for p in (data_dir, *data_dir.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """rmdir each folder, deepest first, stopping at the first that is gone or not empty: never removes a file."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return
