"""Object storage for pods without a shared volume (pyarrow.fs: s3://, gs://, abfs://, file://).

Paths keep their place under DISTILL_HOME: `<root>/<path relative to home>`, so the Dagster side and
the pod agree on where each artifact lives.
"""

from __future__ import annotations

from pathlib import Path

def object_uri(root: str, home: Path, local: Path) -> str:
    rel = Path(local).resolve().relative_to(Path(home).resolve())
    return root.rstrip("/") + "/" + "/".join(rel.parts)


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def push_dir(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def pull_dir(uri: str, local: Path) -> bool:
    """Copy a directory down; False when it does not exist."""
    import pyarrow.fs as pafs

    if not _exists(uri):
        return False
    fs, path = pafs.FileSystem.from_uri(uri)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local).resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True
