"""Where a study keeps what any node may need to read: Tune's state, Ray's checkpoints and each trial's record.

A study's storage is a directory on a filesystem every node reaches: by default the study
directory (one machine, or ``$QSTUDY_HOME`` on a shared mount), or any URI pyarrow
understands, ``s3://bucket/prefix`` or ``gs://...``, query parameters such as
``endpoint_override`` included. Each study gets ``<storage>/<study name>``, laid out as:

- ``tune/``: Tune's experiment state and the in-actor trials' checkpoints;
- ``train/``: each multi-worker trial's Ray Train run;
- ``trials/<trial id>/``: the trial's record, read by whichever node runs it next: the
  newest checkpoint it persisted, its final result once trained, and why it failed or ran
  out of memory (a restart gives up at once on those).

Every read and write goes through the storage's pyarrow filesystem, never ``pathlib``, so
the same code serves a local disk and an object store. Imports no torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from urllib.parse import urlparse

# A trial's record, in trials/<trial id>/.
LAST_CHECKPOINT = "last_checkpoint.txt"  # the newest checkpoint Ray persisted (a path on the storage)
FINAL_RESULT = "final_result.json"  # the last result, once the trial is trained
FAILED_MARKER = "failed.txt"  # the traceback of what the training code raised
OUT_OF_MEMORY_MARKER = "out_of_memory.txt"  # the traceback of the allocation that failed
EPOCH_METRICS = "epoch_metrics.json"  # inside every checkpoint, beside the engine's files


def is_local(uri: str) -> bool:
    """A path on this machine's filesystem (shared or not), as opposed to an object store's URI."""
    return urlparse(uri).scheme in ("", "file")


@dataclass(frozen=True)
class StudyStorage:
    """One study's directory on its storage: ``<uri>/<study>``. Picklable: trials on any node get it."""

    uri: str  # as the user gave it (``--storage``, the space's ``storage:``), or the home's studies directory
    study: str

    @functools.cached_property
    def _filesystem_and_root(self):
        from pyarrow import fs

        if is_local(self.uri):
            path = urlparse(self.uri).path if self.uri.startswith("file:") else self.uri
            return fs.LocalFileSystem(), os.path.abspath(os.path.join(path, self.study))
        filesystem, root = fs.FileSystem.from_uri(self.uri)
        return filesystem, f"{root.rstrip('/')}/{self.study}"

    @property
    def local(self) -> bool:
        return is_local(self.uri)

    @property
    def filesystem(self):
        return self._filesystem_and_root[0]

    @property
    def root(self) -> str:
        """The study's directory as a path in :attr:`filesystem` (no scheme, no query)."""
        return self._filesystem_and_root[1]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def where(self, *parts: str) -> str:
        """``parts``' place as a user reads it: a local path, or the store's ``scheme://`` path."""
        return self.path(*parts) if self.local else f"{urlparse(self.uri).scheme}://{self.path(*parts)}"

    def ray_filesystem(self) -> dict:
        """The ``storage_filesystem`` argument of Ray's storage APIs: none for a local disk, which Ray opens itself."""
        return {} if self.local else {"storage_filesystem": self.filesystem}

    def ray_storage(self, *parts: str) -> dict:
        """``storage_path`` (and ``storage_filesystem``) of a Tune or Train ``RunConfig``."""
        return {"storage_path": self.path(*parts), **self.ray_filesystem()}

    def exists(self, path: str) -> bool:
        from pyarrow import fs

        return self.filesystem.get_file_info(path).type != fs.FileType.NotFound

    def read_text(self, path: str) -> str | None:
        """The text of the file at ``path`` (a path in :attr:`filesystem`); None where there is none."""
        from pyarrow import fs

        if self.filesystem.get_file_info(path).type != fs.FileType.File:
            return None
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, path: str, text: str) -> None:
        """Replace the file at ``path``: an object store writes an object whole; a local disk renames a full file."""
        parent = path.rpartition("/")[0]
        self.filesystem.create_dir(parent, recursive=True)
        target = f"{path}.partial" if self.local else path
        with self.filesystem.open_output_stream(target) as stream:
            stream.write(text.encode())
        if self.local:
            self.filesystem.move(target, path)

    def delete(self, path: str) -> None:
        from pyarrow import fs

        kind = self.filesystem.get_file_info(path).type
        if kind == fs.FileType.Directory:
            self.filesystem.delete_dir(path)
        elif kind == fs.FileType.File:
            self.filesystem.delete_file(path)

    def trial_file(self, trial_id: str, name: str) -> str:
        """A file of the record of trial ``trial_id`` (one of this module's record names)."""
        return self.path("trials", trial_id, name)

    def checkpoint(self, path: str):
        """The Ray checkpoint at ``path`` on this storage."""
        from ray.train import Checkpoint

        return Checkpoint(path, filesystem=self.filesystem)
