"""Webdataset shards (``.tar``, also ``.tar.gz``) read with :mod:`tarfile` alone.

As webdataset does, consecutive members with one key are one sample: ``KEY.jpg`` (or ``.png``,
``.webp``...) is the image, ``KEY.txt`` the caption and ``KEY.json`` metadata, whose ``caption``
and ``url`` fill in those columns. The key is the member name up to the first dot of its base
name. Samples are numbered across the shards in the order given (sorted by the caller).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from clipserve.bulk.records import (
    IMAGE_SUFFIXES,
    SIDECAR_MAX_BYTES,
    BulkInputError,
    Record,
    Skip,
    SourceFormat,
    decode_text,
    json_metadata,
)

TAR_SUFFIXES: Final = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTS: Final = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
_CAPTION_EXTS: Final = ("txt", "caption")
_MEMBER_NAME: Final = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard notation: ``a{000..002}.tar`` → ``a000.tar a001.tar a002.tar``
    (zero padding kept) and ``{x,y}`` alternatives; several braces multiply."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first)
        options = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [expanded for o in options for expanded in expand_braces(head + o + tail)]


@dataclass(slots=True)
class _Sample:
    key: str
    tar: Path
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


class TarSource:
    """Webdataset shards read with :mod:`tarfile`: consecutive members with one key are one
    sample."""

    format: SourceFormat = "webdataset"
    has_images = True

    def __init__(self, paths: list[Path], *, max_member_bytes: int, description: str) -> None:
        self.paths = paths
        self.description = description
        self.max_member_bytes = max_member_bytes
        samples = self._samples(read=lambda _: False)
        first = next(samples, None)
        samples.close()
        self.has_captions = first is not None and any(ext in first.members for ext in _CAPTION_EXTS)

    def count(self) -> int | None:
        """Samples in all shards (headers only); None for compressed shards."""
        if any(not p.name.lower().endswith(".tar") for p in self.paths):
            return None
        return sum(1 for _ in self._samples(read=lambda _: False))

    def _samples(self, read: Callable[[int], bool]) -> Generator[_Sample, None, None]:
        index = 0
        for path in self.paths:
            with _open_tar(path) as tar:
                sample: _Sample | None = None
                try:
                    for member in tar:
                        match = _MEMBER_NAME.match(member.name)
                        if not member.isfile() or match is None:
                            continue
                        key, ext = match.group(1), match.group(2).lower()
                        if sample is None or key != sample.key:
                            if sample is not None:
                                yield sample
                                index += 1
                            sample = _Sample(key, path)
                        sample.members[ext] = member
                        if read(index) and _wanted(ext):
                            self._read(tar, member, ext, sample)
                except (OSError, tarfile.TarError) as exc:
                    raise BulkInputError(f"{path}: unreadable tar: {exc}") from exc
                if sample is not None:
                    yield sample
                    index += 1

    def _read(self, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, s: _Sample) -> None:
        limit = self.max_member_bytes if _is_image(ext) else SIDECAR_MAX_BYTES
        if member.size > limit:
            s.problem = f"{member.name} is too large: {member.size} bytes, over {limit}"
            return
        stream = tar.extractfile(member)
        if stream is not None:
            s.data[ext] = stream.read()

    def records(self, skip: Skip | None = None) -> Iterator[Record]:
        def read(index: int) -> bool:
            return skip is None or not skip(index)

        for index, sample in enumerate(self._samples(read)):
            if not read(index):
                continue
            yield _sample_record(index, sample)

    def close(self) -> None:
        pass


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise BulkInputError(f"cannot read {path}: {exc}") from exc


def _wanted(ext: str) -> bool:
    return _is_image(ext) or ext in (*_CAPTION_EXTS, "json")


def _is_image(ext: str) -> bool:
    """``jpg``, or a compound extension that ends in one (``seg.png``)."""
    return ext.rpartition(".")[2] in _IMAGE_EXTS


def _sample_record(index: int, sample: _Sample) -> Record:
    image_ext = next((e for e in _IMAGE_EXTS if e in sample.members), None) or next(
        (e for e in sample.members if _is_image(e)), None
    )
    metadata, problem = json_metadata(sample.data.get("json"))
    caption = decode_text(sample.data.get("txt", sample.data.get("caption")))
    if caption is None and isinstance(metadata.get("caption"), str):
        caption = metadata["caption"]
    url = metadata.get("url")
    metadata = {k: v for k, v in metadata.items() if k not in ("key", "caption", "url")}
    image_path = f"{sample.tar}/{sample.members[image_ext].name}" if image_ext else None
    return Record(
        index,
        sample.key,
        image=sample.data.get(image_ext) if image_ext else None,
        image_path=image_path,
        url=url if isinstance(url, str) else None,
        caption=caption,
        metadata=metadata,
        problem=sample.problem or problem,
    )
