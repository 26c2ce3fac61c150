"""Stage 0, reading: YAML text -> plain data plus the line and column of every node.

Called by `manifest` (grove files) and `inbox` (spawn requests). Only YAML's core types
are built (no Python tags), anchors/aliases are expanded under a node budget so an alias
bomb fails fast, and files over a size limit are refused before parsing. `read_regular`
(also used for credential files and the manifest digest) reads only regular files, without
ever blocking on a FIFO or reading a device, and never more than its limit.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.errors import Diagnostic

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64
# Nodes a file may expand to: every node of an alias-free document (each takes at least two
# bytes of text) plus a little; anchors and aliases that expand past it are an alias bomb.
MIN_NODE_BUDGET = 10_000

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CORE = "tag:yaml.org,2002:"
_MAP, _SEQ, _STR = f"{_CORE}map", f"{_CORE}seq", f"{_CORE}str"
_sc = yaml.constructor.SafeConstructor()
_SCALARS: dict[str, Callable[[yaml.ScalarNode], Any]] = {
    f"{_CORE}null": lambda _n: None,
    f"{_CORE}bool": _sc.construct_yaml_bool,
    f"{_CORE}int": _sc.construct_yaml_int,
    f"{_CORE}float": _sc.construct_yaml_float,
    f"{_CORE}timestamp": lambda n: n.value,  # kept as the text the user wrote
}

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Document:
    """One YAML document: its data and where each node of it came from."""

    file: str
    index: int  # position of the document in its file, from 0
    data: Any
    marks: dict[Path_, tuple[int, int]]  # JSON path -> (line, col), both from 1

    def where(self, path: Path_ = ()) -> tuple[int, int]:
        """The position of `path`, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p not in self.marks and p:
            p = p[:-1]
        return self.marks.get(p, (1, 1))

    def diag(self, path: Path_, message: str) -> Diagnostic:
        line, col = self.where(path)
        return Diagnostic(self.file, line, col, message, format_path(path))


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class YamlError(Exception):
    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(str(diagnostic))
        self.diagnostic = diagnostic


class NotReadable(Exception):
    """A file refused by `read_regular`; the message says why (`is a FIFO, not a regular
    file`), to follow the file's name."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def read_regular(path: Path, limit: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them. Opens without
    blocking (a FIFO never stalls), checks the type on the open descriptor before reading,
    and reads at most limit + 1 bytes (a file that lies about its size, or grows, is cut
    off). Raises NotReadable for anything else, OSError when it cannot be opened."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (0 if follow_symlinks else os.O_NOFOLLOW))
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise NotReadable("is a symbolic link, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((what for test, what in _KINDS if test(st.st_mode)), "special")
            raise NotReadable(f"is {kind}, not a regular file")
        if st.st_size > limit:
            raise NotReadable(f"is {st.st_size} bytes, over the {limit}-byte limit")
        data = _read_at_most(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotReadable(f"is over the {limit}-byte limit")
    return data


def _read_at_most(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.read(fd, min(1 << 20, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Builder:
    def __init__(self, file: str, budget: int) -> None:
        self.file = file
        self.budget = budget
        self.marks: dict[Path_, tuple[int, int]] = {}

    def fail(self, node: yaml.Node, message: str) -> YamlError:
        m = node.start_mark
        return YamlError(Diagnostic(self.file, m.line + 1, m.column + 1, message))

    def build(self, node: yaml.Node, path: Path_, depth: int, at: yaml.Node) -> Any:
        """Plain data for `node`; `at` (the node itself, or its key) is where `path` is."""
        self.budget -= 1
        if self.budget < 0:
            raise self.fail(node, "document expands to too many nodes through anchors and "
                                  "aliases (an alias bomb?)")
        mark = at.start_mark
        self.marks[path] = (mark.line + 1, mark.column + 1)
        tag = node.tag
        if isinstance(node, yaml.ScalarNode):
            if tag == _STR:
                return node.value
            make = _SCALARS.get(tag)
            if make is None:
                raise self.fail(node, f"unsupported YAML tag {_short_tag(tag)} (only plain "
                                      "YAML values are allowed)")
            return make(node)
        if depth >= MAX_DEPTH:
            raise self.fail(node, f"document nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.SequenceNode) and tag == _SEQ:
            return [self.build(v, (*path, i), depth + 1, v) for i, v in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode) and tag == _MAP:
            return self._mapping(node, path, depth)
        raise self.fail(node, f"unsupported YAML tag {_short_tag(tag)} (only plain YAML "
                              "values are allowed)")

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == f"{_CORE}merge":
                raise self.fail(key_node, "YAML merge keys (<<) are not supported")
            if not isinstance(key_node, yaml.ScalarNode) or (key_node.tag != _STR
                                                             and key_node.tag not in _SCALARS):
                raise self.fail(key_node, "mapping keys must be plain strings")
            key = str(key_node.value)  # `NO: 1` is the variable NO, not the boolean false
            if key in out:
                raise self.fail(key_node, f"duplicate key {key!r}")
            out[key] = self.build(value_node, (*path, key), depth + 1, key_node)
        return out


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """Pause the cyclic garbage collector while large trees of plain, acyclic data are
    built (every node, mark and agent of a grove): with 100,000s of live objects, each full
    collection walks all of them and finds nothing. Nested use is fine."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def load_text(text: str, file: str) -> list[Document]:
    """Parse every document in `text`; raise YamlError naming file:line:col."""
    docs: list[Document] = []
    budget = MIN_NODE_BUDGET + len(text) // 2
    try:
        for i, node in enumerate(_compose_all(text)):
            if node is None:
                continue
            b = _Builder(file, budget)
            data = b.build(node, (), 0, node)
            budget = b.budget
            docs.append(Document(file, i, data, b.marks))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = e.problem or e.context or "invalid YAML"
        lines = text.splitlines()
        indent = lines[line - 1][:col] if 0 < line <= len(lines) else ""
        if "\t" in indent and not indent.strip(" \t"):
            msg = "tab character used for indentation (YAML allows only spaces)"
        raise YamlError(Diagnostic(file, line, col, f"invalid YAML: {msg}")) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. NUL
        pos = e.position if isinstance(e.position, int) else 0
        line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        what = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise YamlError(Diagnostic(file, line, col, f"invalid YAML: character {what} is not "
                                                    "allowed (control characters)")) from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise YamlError(Diagnostic(file, 1, 1, f"invalid YAML: {first}")) from None
    except RecursionError:
        raise YamlError(Diagnostic(file, 1, 1, "invalid YAML: nested too deeply")) from None
    return docs


def _compose_all(text: str) -> Iterator[yaml.Node | None]:
    loader = _Loader(text)
    try:
        while loader.check_node():
            yield loader.get_node()
    finally:
        loader.dispose()


def load_file(path: Path, display: str | None = None, follow_symlinks: bool = True
              ) -> list[Document]:
    """Read and parse a YAML file, refusing what is not a regular file (without blocking
    on it), oversized files and non-UTF-8 text. Manifests are read with
    `follow_symlinks=False`: a symlink in a grove directory is refused, not followed."""
    name = display or str(path)
    try:
        text = read_regular(path, MAX_FILE_BYTES, follow_symlinks).decode("utf-8")
    except NotReadable as e:
        raise YamlError(Diagnostic(name, 1, 1, f"file {e}")) from None
    except UnicodeDecodeError as e:
        raise YamlError(Diagnostic(name, 1, 1, f"not UTF-8 text: {e.reason}")) from None
    except OSError as e:
        raise YamlError(Diagnostic(name, 0, 0, f"cannot read: {e.strerror}")) from None
    return load_text(text, name)
