"""Saved chat sessions on disk: our state file, the server's slot files, and the
private directory those pass through.

A state file is::

    b"LLAMAROCM-CHAT-STATE\\n"   magic (21 bytes)
    uint64, little-endian        length of the JSON header
    JSON header (UTF-8)          format, model identity, server build, LoRA adapters
                                 (identity and scale), KV-cache flags, messages,
                                 token count, length and sha256 of the slot bytes
    slot bytes                   llama-server's slot file (its KV cache), as it wrote it

The identity of a model is its file size plus the sha256 of its GGUF header (metadata
and tensor table, everything before the weights): cheap to compute, and any other
model file, even one with the same name, differs; a LoRA adapter's identity is taken
the same way. A state file is refused when the identity or the server build differs
(the adapters and flags are compared by :mod:`llamarocm._kv_setup`), and when it is cut
short or its bytes do not hash to what the header says, before anything reaches the
server.

Format 1 had neither adapters nor flags in its header: such a file is read (its
messages are still good), and refused as a mismatch by :func:`check_identity`.

llama-server reads and writes slot files only inside its ``--slot-save-path``
directory. That directory is created by :class:`PrivateDirectory` (mode 0700, so
conversations are readable by their owner only), each file in it gets a generated name
(never one taken from user text), lives only for one save or restore, and the
directory goes when the model closes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import uuid
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._files import write_whole
from .errors import SessionFileError, SessionMismatchError
from .gguf import read_metadata

__all__ = [
    "PrivateDirectory",
    "StateFile",
    "model_identity",
    "write_state_file",
    "read_state_file",
    "check_identity",
    "slot_file_holds",
]

MAGIC = b"LLAMAROCM-CHAT-STATE\n"
FORMAT = 2
#: Formats read for their messages only: their KV state is refused (see check_identity).
OLD_FORMATS = (1,)
_LENGTH = struct.Struct("<Q")
#: A header longer than this is not ours (a conversation of that size is absurd).
MAX_HEADER_BYTES = 1 << 30
# llama.cpp's sequence state files start with this magic ("ggsq"), a version and a
# count of int32 token values (the server's slot files add a few markers around the
# tokens themselves, so the tokens are looked for as a run inside that array).
_SEQ_MAGIC = 0x67677371

_identities: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
_identities_lock = threading.Lock()


def model_identity(path: str) -> Dict[str, Any]:
    """``{"file_size", "header_sha256"}`` of the GGUF file at ``path``, a model or a
    LoRA adapter (cached while the file's size and modification time stay the same)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _identities_lock:
        known = _identities.get(key)
    if known is not None:
        return dict(known)
    header_end = read_metadata(path).data_offset or st.st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = header_end
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    identity = {"file_size": st.st_size, "header_sha256": digest.hexdigest()}
    with _identities_lock:
        _identities[key] = identity
    return dict(identity)


class StateFile:
    """A state file as read: its header and the server's slot bytes."""

    def __init__(self, path: str, header: Dict[str, Any], slot_bytes: bytes) -> None:
        self.path = path
        self.header = header
        self.slot_bytes = slot_bytes

    @property
    def messages(self) -> List[Dict[str, Any]]:
        return list(self.header["messages"])

    @property
    def tokens(self) -> int:
        return int(self.header["tokens"])


def write_state_file(
    path: str,
    *,
    identity: Dict[str, Any],
    server_build: Optional[str],
    adapters: Sequence[Dict[str, Any]],
    kv_flags: Sequence[Sequence[str]],
    messages: Sequence[Dict[str, Any]],
    tokens: int,
    slot_bytes: bytes,
) -> None:
    """Write a state file at ``path``, whole or not at all (a temporary file in the
    same directory, synced, then renamed over it), readable by its owner only.
    ``adapters`` and ``kv_flags`` are those of :mod:`llamarocm._kv_setup`."""
    header = {
        "format": FORMAT,
        "model": identity,
        "server_build": server_build,
        "adapters": [dict(adapter) for adapter in adapters],
        "kv_flags": [list(flag) for flag in kv_flags],
        "messages": list(messages),
        "tokens": tokens,
        "slot_bytes": len(slot_bytes),
        "slot_sha256": hashlib.sha256(slot_bytes).hexdigest(),
    }
    encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
    write_whole(path, [MAGIC + _LENGTH.pack(len(encoded)) + encoded, slot_bytes], prefix=".llamarocm-chat-")


def read_state_file(path: str) -> StateFile:
    """Read and check a state file; :class:`~llamarocm.SessionFileError` when it is
    not one, or is truncated or corrupt. ``FileNotFoundError`` when it is missing."""
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + _LENGTH.size)
        if not start.startswith(MAGIC):
            raise SessionFileError(f"{path} is not a saved llamarocm chat session", path)
        if len(start) < len(MAGIC) + _LENGTH.size:
            raise SessionFileError(f"{path} is truncated (its header is cut short)", path)
        (length,) = _LENGTH.unpack(start[len(MAGIC):])
        if length > MAX_HEADER_BYTES:
            raise SessionFileError(f"{path} is corrupt (a header length of {length} bytes)", path)
        encoded = f.read(length)
        if len(encoded) < length:
            raise SessionFileError(f"{path} is truncated (its header is cut short)", path)
        header = _parse_header(path, encoded)
        slot_bytes = f.read(header["slot_bytes"] + 1)
    if len(slot_bytes) != header["slot_bytes"]:
        how = "truncated" if len(slot_bytes) < header["slot_bytes"] else "corrupt (bytes after its end)"
        raise SessionFileError(
            f"{path} is {how}: {len(slot_bytes)} bytes of KV state, the header says {header['slot_bytes']}", path
        )
    if hashlib.sha256(slot_bytes).hexdigest() != header["slot_sha256"]:
        raise SessionFileError(f"{path} is corrupt: its KV state does not match its checksum", path)
    return StateFile(path, header, slot_bytes)


def _parse_header(path: str, encoded: bytes) -> Dict[str, Any]:
    try:
        header = json.loads(encoded.decode("utf-8"))
    except ValueError:
        raise SessionFileError(f"{path} is corrupt: its header is not JSON", path) from None
    if not isinstance(header, dict):
        raise SessionFileError(f"{path} is corrupt: its header is not a JSON object", path)
    if header.get("format") != FORMAT and header.get("format") not in OLD_FORMATS:
        raise SessionFileError(
            f"{path} has format {header.get('format')!r}; this llamarocm reads format {FORMAT}", path
        )
    model = header.get("model")
    valid = (
        isinstance(model, dict)
        and isinstance(header.get("messages"), list)
        and all(isinstance(m, dict) for m in header["messages"])
        and _is_count(header.get("tokens"))
        and _is_count(header.get("slot_bytes"))
        and isinstance(header.get("slot_sha256"), str)
        and (header["format"] in OLD_FORMATS or _is_setup(header.get("adapters"), header.get("kv_flags")))
    )
    if not valid:
        raise SessionFileError(f"{path} is corrupt: its header lacks fields or has wrong types", path)
    return header


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_setup(adapters: Any, kv_flags: Any) -> bool:
    return (
        isinstance(adapters, list)
        and all(isinstance(a, dict) for a in adapters)
        and isinstance(kv_flags, list)
        and all(isinstance(f, list) and f and all(isinstance(v, str) for v in f) for f in kv_flags)
    )


def check_identity(state: StateFile, identity: Dict[str, Any], server_build: Optional[str]) -> None:
    """Refuse ``state`` unless it was saved by this very model file and server build,
    in this format (an older one did not record all the KV state depends on)."""
    if state.header["format"] != FORMAT:
        raise SessionMismatchError(
            f"{state.path} was saved by an older llamarocm (format {state.header['format']}), which did not "
            "record the LoRA adapters and KV-cache flags its KV state depends on: its KV state is refused",
            state.path,
            state.messages,
        )
    saved = state.header["model"]
    if saved.get("file_size") != identity["file_size"] or saved.get("header_sha256") != identity["header_sha256"]:
        raise SessionMismatchError(
            f"{state.path} was saved with another model file "
            f"({saved.get('file_size')} bytes, header sha256 {str(saved.get('header_sha256'))[:12]}...), "
            f"not this one ({identity['file_size']} bytes, {identity['header_sha256'][:12]}...): "
            "its KV state is refused",
            state.path,
            state.messages,
        )
    if state.header.get("server_build") != server_build:
        raise SessionMismatchError(
            f"{state.path} was saved by llama-server build {state.header.get('server_build')!r}, "
            f"this server is {server_build!r}: its KV state is refused",
            state.path,
            state.messages,
        )


def slot_file_holds(data: bytes, expected: Sequence[int]) -> bool:
    """Whether a llama-server slot file's token list holds ``expected`` as a run.

    The check that a slot saved a moment after it was primed with a conversation still
    holds that conversation, and not another request's that took the slot in between.
    """
    if len(data) < 12:
        return False
    magic, _version, count = struct.unpack_from("<III", data, 0)
    if magic != _SEQ_MAGIC or len(data) < 12 + 4 * count:
        return False
    values = struct.unpack_from(f"<{count}i", data, 12)
    want = tuple(expected)
    if not want:
        return True
    # The run starts after at most a few markers; the first token narrows the search.
    for start in range(0, min(count - len(want), 16) + 1):
        if values[start] == want[0] and values[start : start + len(want)] == want:
            return True
    return False


class PrivateDirectory:
    """A directory only its owner can enter (0700), for llama-server's slot files;
    removed by :meth:`remove` (a model's close), or at exit as a backstop."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="llamarocm-slots-")  # created 0700
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def new_file(self) -> str:
        """A fresh file name inside the directory (the name only: llama-server takes
        names relative to its ``--slot-save-path``)."""
        return f"slot-{uuid.uuid4().hex}.bin"

    def remove(self) -> None:
        """Delete the directory and what is in it. Idempotent."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"<PrivateDirectory {self.path}>"
