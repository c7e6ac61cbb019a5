"""SHA-256 manifests: every file a model loader reads is covered.

A manifest maps each regular file under a directory (relative POSIX path) to
its SHA-256. Its digest is the SHA-256 of its canonical JSON, so one short
string pins every byte of a saved model. A bundle carries its own
``manifest.json`` (a local check against accidental or naive edits); the
registry records the digest of the whole logged model at registration, where
the artifact store cannot rewrite it, and the loaders compare against that.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from models.atomic import atomic_write_bytes

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A saved model's files do not match their recorded checksums."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_manifest(
    root: Path, skip: Iterable[str] = (), ignore_dirs: Iterable[str] = ()
) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative POSIX path.

    ``skip`` names files (relative paths) left out; ``ignore_dirs`` names
    directories left out wherever they are (``__pycache__`` of a source tree).
    A symlink or any other non-regular entry is refused: a loader following it
    would read bytes the manifest does not cover.
    """
    root = Path(root)
    skipped = set(skip)
    ignored = set(ignore_dirs)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in ignored]
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            full = base / name
            rel = full.relative_to(root).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise IntegrityError(
                    f"{full} is not a regular file (a symlink or device) in a saved"
                    " model; refused"
                )
            if rel not in skipped:
                out[rel] = file_sha256(full)
    return dict(sorted(out.items()))


def canonical(manifest: Mapping[str, str]) -> bytes:
    return (
        json.dumps(dict(sorted(manifest.items())), separators=(",", ":")) + "\n"
    ).encode()


def manifest_digest(manifest: Mapping[str, str]) -> str:
    """The SHA-256 of the manifest's canonical JSON."""
    return hashlib.sha256(canonical(manifest)).hexdigest()


def compare(root: Path, expected: Mapping[str, str], actual: Mapping[str, str]) -> None:
    """Raise a one-line IntegrityError naming the first file that differs."""
    for rel in sorted(set(expected) | set(actual)):
        where = Path(root) / rel
        if rel not in actual:
            raise IntegrityError(f"{where} is missing from the saved model")
        if rel not in expected:
            raise IntegrityError(
                f"{where} is not part of the saved model (a file was added)"
            )
        if expected[rel] != actual[rel]:
            raise IntegrityError(
                f"{where} does not match its recorded SHA-256 (modified after it"
                " was saved)"
            )


def write_manifest(root: Path) -> str:
    """Write ``root/manifest.json`` over every other file; return its digest."""
    root = Path(root)
    manifest = tree_manifest(root, skip=(MANIFEST,))
    atomic_write_bytes(root / MANIFEST, canonical(manifest))
    return manifest_digest(manifest)


def read_manifest(path: Path) -> dict[str, str]:
    """A manifest file, checked for shape; a one-line IntegrityError otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IntegrityError(f"{path} is not a readable manifest: {reason}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise IntegrityError(f"{path} is not a manifest of file checksums")
    return data


def check_manifest(root: Path, expected_digest: str | None = None) -> str | None:
    """Verify every file under ``root`` against ``root/manifest.json``.

    Parameters
    ----------
    root : path
        A saved bundle.
    expected_digest : str, optional
        The manifest digest recorded elsewhere (the registry); when given, the
        manifest itself must match it, so a rewritten manifest is caught too.

    Returns
    -------
    The manifest's digest, or None for a bundle saved before manifests existed
    (allowed only when no digest is expected).
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        if expected_digest is not None:
            raise IntegrityError(f"{path} is missing from the saved model")
        return None
    recorded = read_manifest(path)
    digest = manifest_digest(recorded)
    if expected_digest is not None and digest != expected_digest:
        raise IntegrityError(
            f"{path} does not match the digest recorded in the registry (the model"
            " was modified after registration)"
        )
    compare(root, recorded, safe_tree_manifest(root, skip=(MANIFEST,)))
    return digest


def safe_tree_manifest(root: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """:func:`tree_manifest`, with an unreadable file as a one-line IntegrityError."""
    try:
        return tree_manifest(root, skip=skip)
    except OSError as exc:
        raise IntegrityError(
            f"{exc.filename or root} cannot be read: {exc.strerror or exc}"
        ) from None
