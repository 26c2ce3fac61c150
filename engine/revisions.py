"""Stage 1-2 at a git revision: a grove's manifests at REV -> `DesiredGrove`, no checkout.

Called by `topology` (for `engine graph --base`, `engine plan --base`) and `history`.
Lists the grove files with one `git ls-tree`, reads them with one `git cat-file --batch`,
and feeds the texts to `manifest.load_grove` and `desired.build` without resolving
secrets. Returns the groves found at the revision by name (a grove absent there is simply
missing from the result). Problems name the side (base or head) they belong to.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from engine import desired, manifest
from engine.errors import Diagnostic, EngineError, InvalidManifests
from engine.trust import git as trust_git
from engine.yamlio import MAX_FILE_BYTES

WORKTREE = "working tree"


@dataclass(frozen=True)
class Side:
    """One side of a comparison: `ref` as the user wrote it, `commit` its full hash
    (both None for the working tree)."""

    label: str  # "base" or "head"
    ref: str | None
    commit: str | None

    def describe(self) -> str:
        if self.ref is None or self.commit is None:
            return WORKTREE
        short = self.commit[:12]
        return short if self.ref.startswith(short[:7]) else f"{self.ref} ({short})"


class InvalidRevision(EngineError):
    """The manifests on one side of a comparison do not load; says which side and why."""

    def __init__(self, side: Side, diagnostics: list[Diagnostic]) -> None:
        self.side = side
        self.diagnostics = sorted(set(diagnostics))
        n = len(self.diagnostics)
        more = f" (and {n - 1} more)" if n > 1 else ""
        first = str(self.diagnostics[0]) if n else "invalid manifests"
        super().__init__(f"{side.label} {side.describe()}: invalid manifests: {first}{more}",
                         "\n".join(f"{side.label}: {d}" for d in self.diagnostics))


def git(root: Path, *args: str, stdin: bytes | None = None) -> bytes:
    """Run git in `root` (the hardened runner); a failure is an EngineError carrying
    git's own message."""
    r = trust_git.call(root, *args, input=stdin)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()
        raise EngineError(f"git {args[0]}: {msg[-1] if msg else 'failed'}")
    return r.out


def resolve(root: Path, ref: str) -> str:
    """The full commit hash `ref` names; `revision X not found` when it names none."""
    if ref.startswith("-") or not ref.strip():
        raise EngineError(f"revision {ref!r} not found")
    try:
        git(root, "rev-parse", "--git-dir")
    except EngineError:
        raise EngineError(f"{root}: not a git repository (comparing revisions needs "
                          "git history)") from None
    try:
        out = git(root, "rev-parse", "--verify", "--quiet", "--end-of-options",
                  f"{ref}^{{commit}}")
    except EngineError:
        raise EngineError(f"revision {ref} not found") from None
    return out.decode().strip()


def grove_blobs(root: Path, commit: str) -> dict[str, dict[str, str]]:
    """Grove name -> {file name: blob hash} of the `*.yaml` files directly in each
    `groves/<name>/` directory at `commit` (a directory with no YAML maps to {}). `root`
    may be a sub-directory of the git repository (a monorepo)."""
    out: dict[str, dict[str, str]] = {}
    raw = git(root, "ls-tree", "-r", "-z", commit, "--", manifest.GROVES_DIR + "/")
    prefix = _prefix(root)
    for rec in raw.decode("utf-8", errors="surrogateescape").split("\0"):
        if not rec:
            continue
        meta, _, path = rec.partition("\t")
        mode, kind, sha = meta.split()
        parts = path.removeprefix(prefix).split("/")
        if len(parts) < 3 or parts[1].startswith("."):  # a dot-directory is not a grove
            continue
        files = out.setdefault(parts[1], {})
        if len(parts) == 3 and kind == "blob" and mode != "120000" \
                and parts[2].endswith(".yaml"):
            files[parts[2]] = sha
    return out


@functools.cache
def _prefix(root: Path) -> str:
    """Where `root` sits inside its git repository ("" at the top, "infra/" below it):
    `git ls-tree` names files from the top of the tree."""
    return git(root, "rev-parse", "--show-prefix").decode().strip()


def read_blobs(root: Path, shas: list[str]) -> dict[str, bytes]:
    """Contents of blobs by hash, read with one `git cat-file --batch`."""
    wanted = sorted(set(shas))
    if not wanted:
        return {}
    raw = git(root, "cat-file", "--batch", stdin="".join(s + "\n" for s in wanted).encode())
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(raw):
        nl = raw.index(b"\n", pos)
        head = raw[pos:nl].decode().split()
        if len(head) != 3:  # "<sha> missing"
            pos = nl + 1
            continue
        size = int(head[2])
        out[head[0]] = raw[nl + 1:nl + 1 + size]
        pos = nl + 1 + size + 1
    return out


def texts_at(root: Path, commit: str, names: list[str] | None = None
             ) -> tuple[dict[str, dict[str, str]], list[Diagnostic]]:
    """Grove name -> {file: text} at `commit`, and diagnostics for unreadable files."""
    blobs = grove_blobs(root, commit)
    if names is not None:
        blobs = {n: f for n, f in blobs.items() if n in names}
    data = read_blobs(root, [s for files in blobs.values() for s in files.values()])
    texts: dict[str, dict[str, str]] = {}
    diags: list[Diagnostic] = []
    for grove, files in sorted(blobs.items()):
        texts[grove] = {}
        for name, sha in sorted(files.items()):
            display = f"{manifest.GROVES_DIR}/{grove}/{name}"
            body = data.get(sha, b"")
            if len(body) > MAX_FILE_BYTES:
                diags.append(Diagnostic(display, 1, 1, f"file is {len(body)} bytes, over the "
                                                       f"{MAX_FILE_BYTES}-byte limit"))
                continue
            try:
                texts[grove][name] = body.decode("utf-8")
            except UnicodeDecodeError as e:
                diags.append(Diagnostic(display, 1, 1, f"not UTF-8 text: {e.reason}"))
    return texts, diags


def digest(texts: dict[str, str]) -> str:
    """The same digest `desired.manifest_digest` computes over files on disk."""
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(name.encode() + b"\0" + texts[name].encode() + b"\0")
    return h.hexdigest()[:16]


def default_options(root: Path) -> desired.Options:
    """Comparing revisions (graph --base, history, pull-request checks) reads manifests a
    pull request may have written: no secret is read and no environment value reaches a
    template."""
    return desired.Options(resolve_secrets=False, repo_root=root, host_env=False)


Known = dict[str, desired.DesiredGrove]


def _reuse(known: Known | None, grove: str, digest_: str) -> desired.DesiredGrove | None:
    """A grove already built from byte-identical manifests (the other side of a diff)."""
    g = (known or {}).get(grove)
    return g if g is not None and g.manifest_digest == digest_ else None


def load_revision(root: Path, ref: str, label: str = "base", names: list[str] | None = None,
                  opts: desired.Options | None = None, known: Known | None = None
                  ) -> tuple[Side, dict[str, desired.DesiredGrove]]:
    """Desired state of every grove (or the named ones) at revision `ref`; a grove whose
    files are identical to one in `known` is taken from there instead of rebuilt."""
    side = Side(label, ref, resolve(root, ref))
    assert side.commit is not None
    texts, diags = texts_at(root, side.commit, names)
    out: dict[str, desired.DesiredGrove] = {}
    opts = opts or default_options(root)
    for grove, files in texts.items():
        directory = root / manifest.GROVES_DIR / grove
        same = _reuse(known, grove, digest(files))
        if same is not None:
            out[grove] = same
            continue
        try:
            g = desired.build(manifest.load_grove(directory, root, texts=files), opts)
            out[grove] = dataclasses.replace(g, manifest_digest=digest(files))
        except InvalidManifests as e:
            diags.extend(e.diagnostics)
    if diags:
        raise InvalidRevision(side, diags)
    return side, out


def load_worktree(root: Path, names: list[str] | None = None,
                  opts: desired.Options | None = None, label: str = "head",
                  known: Known | None = None) -> tuple[Side, dict[str, desired.DesiredGrove]]:
    """Desired state of the groves in the working tree, as the head of a comparison."""
    side = Side(label, None, None)
    out: dict[str, desired.DesiredGrove] = {}
    diags: list[Diagnostic] = []
    opts = opts or default_options(root)
    for directory in manifest.grove_dirs(root):
        if names is not None and directory.name not in names:
            continue
        same = _reuse(known, directory.name, desired.manifest_digest(directory))
        if same is not None:
            out[directory.name] = same
            continue
        try:
            out[directory.name] = desired.build(manifest.load_grove(directory, root), opts)
        except InvalidManifests as e:
            diags.extend(e.diagnostics)
    if diags:
        raise InvalidRevision(side, diags)
    return side, out
