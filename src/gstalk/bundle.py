"""Avatar bundles: a trained avatar in one portable file, ``NAME.gstalk``.

A bundle is a packed, read-only view of a workspace: exactly what rendering new speech
needs (:class:`gstalk.avatar.Avatar`), nothing of the training data. It is a plain zip
archive with uncompressed members (``unzip -l`` lists them)::

    bundle.json          format, bundle_version, gstalk_version, created, name,
                         files {member: {sha256, bytes}}, avatar (a summary), provenance
    model.safetensors    fine/model.safetensors, byte for byte (canonical Gaussians,
                         the deformation model with its articulation regressor and torso field)
    avatar.safetensors   viewmats [N, 4, 4], K [3, 3], blink [N] float32, plate [H, W, 3]
                         uint8, audio.<name> (the audio features' small tensors, e.g.
                         mean/std [C]); metadata: name, fps, size, split, seed, audio
                         {config, metadata}

Reading checks, in order, and refuses with :class:`~gstalk.errors.InputError` naming the
file and the reason: a zip archive at all (else "not a gstalk avatar bundle", or "damaged
or truncated" when it starts like one), a ``bundle.json`` with ``format`` =
``gstalk-avatar`` (else foreign), a ``bundle_version`` this gstalk reads (else "newer:
upgrade gstalk"), every listed member present, stored uncompressed, of the listed size and
SHA-256, and tensors that decode and build the model. Only JSON and safetensors are ever
decoded: nothing is unpickled, no member is extracted to disk by name.

A workspace trained without the torso field (``--set torso=false``) is refused at export:
its renders paste the torso of each training frame from the workspace's frames and masks,
which a bundle does not carry (hundreds of frames); re-train it with the torso field (the
default) to export it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gstalk import __version__
from gstalk.avatar import AudioSettings, Avatar
from gstalk.errors import InputError, UsageError, WorkspaceError
from gstalk.workspace import FINE_MODEL, Workspace, atomic_dir, atomic_write, now_iso

BUNDLE_FORMAT = "gstalk-avatar"
BUNDLE_VERSION = 1  # raised when a member or field changes meaning; readers refuse newer ones
BUNDLE_JSON = "bundle.json"
MODEL_FILE = "model.safetensors"
AVATAR_FILE = "avatar.safetensors"
MEMBERS = (MODEL_FILE, AVATAR_FILE)
SUFFIX = ".gstalk"
MAX_JSON_BYTES = 4 << 20  # a bundle.json larger than this is not one of ours
MAX_MEMBER_BYTES = 16 << 30

_REEXPORT = "export it again (gstalk export WS -o FILE) or copy it again; `gstalk inspect FILE` checks a copy"


@dataclass
class Bundle:
    """A read and verified bundle (:func:`read_bundle`).

    Attributes:
        path: where it was read from (a file, an unpacked folder, or a label for bytes).
        info: the parsed ``bundle.json``.
        members: member name -> its bytes (checksums verified).
        info_bytes: ``bundle.json`` as stored.
        sha256: SHA-256 of ``bundle.json``'s bytes: an id of the bundle's content (it lists
            every member's checksum).
    """

    path: str
    info: dict[str, Any]
    members: dict[str, bytes]
    info_bytes: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.info_bytes).hexdigest()

    def avatar(self) -> Avatar:
        """Decode the avatar (tensors and the model).

        Raises:
            InputError: a member does not decode, or the model does not build from it.
        """
        from gstalk.dataset import fine_model_from_tensors
        from gstalk.tensorio import tensors_from_bytes

        def damaged(member: str, why: str) -> InputError:
            return InputError(f"Avatar bundle {self.path} is damaged: {member} {why}.", hint=_REEXPORT,
                              path=self.path)

        try:
            mt, mmeta = tensors_from_bytes(self.members[MODEL_FILE])
        except ValueError as exc:
            raise damaged(MODEL_FILE, f"is not a valid safetensors file ({exc})") from None
        try:
            at, ameta = tensors_from_bytes(self.members[AVATAR_FILE])
        except ValueError as exc:
            raise damaged(AVATAR_FILE, f"is not a valid safetensors file ({exc})") from None
        try:
            params, model = fine_model_from_tensors(mt, mmeta)
        except UsageError as exc:  # an unknown model name: made by a gstalk with more models
            raise InputError(f"Avatar bundle {self.path} holds a model this gstalk {__version__} cannot build "
                             f"({exc.message})", hint="upgrade gstalk (pip install -U gstalk)",
                             path=self.path) from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise damaged(MODEL_FILE, f"does not build its model ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if getattr(model, "torso", None) is None:
            raise damaged(MODEL_FILE, "has no torso field (bundles carry only models trained with one)")
        try:
            split = ameta["split"]
            audio = ameta["audio"]
            n = int(at["viewmats"].shape[0])
            size = int(ameta["size"])
            plate = at["plate"].numpy()
            ok = (tuple(at["viewmats"].shape[1:]) == (4, 4) and tuple(at["K"].shape) == (3, 3)
                  and tuple(at["blink"].shape) == (n,) and plate.shape == (size, size, 3) and plate.dtype == np.uint8
                  and 0 <= split["train"][0] <= split["train"][1] <= n and 0 <= split["test"][0]
                  <= split["test"][1] <= n and split["train"][1] > split["train"][0])
            if not ok:
                raise ValueError("tensor shapes do not fit together")
            settings = AudioSettings(config=dict(audio["config"]), metadata=dict(audio["metadata"]),
                                     tensors={k.split(".", 1)[1]: v.numpy() for k, v in at.items()
                                              if k.startswith("audio.")},
                                     fps=float(ameta["fps"]))
            _ = settings.extractor, settings.window, settings.sample_rate
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise damaged(AVATAR_FILE, f"is incomplete ({type(exc).__name__}: {exc})") from None
        return Avatar(name=str(ameta.get("name") or self.info.get("name") or Path(self.path).stem), params=params,
                      model=model, meta=mmeta, viewmats=at["viewmats"].float(), K=at["K"].float(),
                      blink=at["blink"].float(), train=range(*split["train"]), test=range(*split["test"]),
                      fps=float(ameta["fps"]), size=size, plate=plate, audio=settings,
                      provenance=dict(self.info.get("provenance", {})), seed=int(ameta.get("seed", 0)))

    def to_bytes(self) -> bytes:
        """The bundle as one file's bytes (the same members; e.g. an unpacked folder packed
        again for Ray's object store)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(BUNDLE_JSON, self.info_bytes)
            for k in MEMBERS:
                z.writestr(k, self.members[k])
        return buf.getvalue()

    def summary(self) -> dict[str, Any]:
        """What ``gstalk inspect`` prints: the bundle's id, version, members and their sizes,
        the avatar summary and the provenance."""
        i = self.info
        return {"bundle": self.path, "sha256": self.sha256, "format": i.get("format"),
                "bundle_version": i.get("bundle_version"), "gstalk_version": i.get("gstalk_version"),
                "created": i.get("created"), "name": i.get("name"), "files": i.get("files"),
                "avatar": i.get("avatar"), "provenance": i.get("provenance"), "verified": True}


# --------------------------------------------------------------------------- writing
def pack_avatar(avatar: Avatar, model_bytes: bytes) -> bytes:
    """The bytes of a bundle (see the module docstring).

    Args:
        avatar: the avatar (with a torso field).
        model_bytes: the bytes of its ``fine/model.safetensors``, stored verbatim.
    """
    from gstalk.tensorio import tensors_to_bytes

    tensors: dict[str, torch.Tensor | np.ndarray] = {
        "viewmats": avatar.viewmats, "K": avatar.K, "blink": avatar.blink, "plate": np.ascontiguousarray(avatar.plate),
        **{f"audio.{k}": np.ascontiguousarray(v) for k, v in avatar.audio.tensors.items()}}
    meta = {"name": avatar.name, "fps": avatar.fps, "size": avatar.size, "seed": avatar.seed,
            "split": {"train": [avatar.train.start, avatar.train.stop], "test": [avatar.test.start, avatar.test.stop]},
            "audio": {"config": avatar.audio.config, "metadata": avatar.audio.metadata}}
    members = {MODEL_FILE: model_bytes, AVATAR_FILE: tensors_to_bytes(tensors, meta)}
    info = {"format": BUNDLE_FORMAT, "bundle_version": BUNDLE_VERSION, "gstalk_version": __version__,
            "created": now_iso(), "name": avatar.name,
            "files": {k: {"sha256": hashlib.sha256(v).hexdigest(), "bytes": len(v)} for k, v in members.items()},
            "avatar": avatar.summary(), "provenance": avatar.provenance}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(BUNDLE_JSON, json.dumps(info, indent=2, default=_json_default) + "\n")
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


def _readable(path: Path) -> None:
    """Give a written file the permissions a plain write would (the temp file behind an
    atomic write is private, 0600), so a bundle on shared storage is readable by the
    cluster's workers."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def workspace_bundle_bytes(ws: Workspace) -> bytes:
    """A workspace (fine stage done) packed as bundle bytes, in memory.

    Raises:
        WorkspaceError: a stage missing or stale, or a model trained without the torso field
            (the message names the fix).
    """
    ws.require("render")
    model_bytes = ws.path(FINE_MODEL).read_bytes()
    avatar = Avatar.from_workspace(ws)
    if not avatar.has_torso_field:
        raise WorkspaceError(
            f"{ws.root} was trained without the torso field (--set torso=false): its renders paste the torso of each "
            "training frame from the workspace's frames and masks, which a bundle does not carry.",
            hint=f"re-train with the torso field (the default): `gstalk fine {ws.root}`, then export again; or "
                 "render from the workspace itself", path=ws.root)
    return pack_avatar(avatar, model_bytes)


def export_bundle(workspace: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """``gstalk export``: write a workspace's avatar as a bundle, atomically.

    Args:
        workspace: a workspace whose fine stage is done (trained with the torso field).
        output: the bundle to write (default ``<workspace name>.gstalk`` in the current
            folder); ``.gstalk`` is added when it has no suffix.

    Returns:
        The bundle's summary (as :meth:`Bundle.summary`), with ``bytes``.

    Raises:
        WorkspaceError: see :func:`workspace_bundle_bytes`. UsageError: the output is a folder.
    """
    ws = Workspace.open(workspace)
    out = Path(output) if output is not None else Path(ws.root.resolve().name + SUFFIX)
    if out.suffix == "":
        out = out.with_suffix(SUFFIX)
    if out.is_dir():
        raise UsageError(f"{out} is a folder; export writes one file.", hint=f"give a file name, e.g. -o {out}/"
                         f"{ws.root.resolve().name}{SUFFIX}")
    data = workspace_bundle_bytes(ws)
    with atomic_write(out) as f:
        f.write(data)
    _readable(out)
    b = read_bundle_bytes(data, str(out))
    return {**b.summary(), "bytes": len(data)}


# --------------------------------------------------------------------------- reading
def read_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle file or an unpacked bundle folder (see the module docstring).

    Raises:
        InputError: missing, not a bundle, damaged or truncated, or newer than this gstalk reads
            (the message names the file and the reason).
    """
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    if not p.is_file():
        raise InputError(f"Avatar bundle {p} does not exist.", hint="check the path (gstalk export WS -o FILE "
                         "makes one)", path=p)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"Avatar bundle {p} cannot be read ({exc.strerror}).", path=p) from None
    return read_bundle_bytes(data, str(p))


def read_bundle_bytes(data: bytes, label: str = "<bytes>") -> Bundle:
    """Verify bundle bytes (e.g. from Ray's object store); ``label`` names them in errors.

    Raises:
        InputError: as :func:`read_bundle`.
    """
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        if data[:4] == b"PK\x03\x04":
            raise InputError(f"Avatar bundle {label} is damaged or truncated: its zip directory is unreadable "
                             f"({len(data)} bytes).", hint=_REEXPORT, path=label) from None
        raise InputError(f"{label} is not a gstalk avatar bundle (not a zip archive).",
                         hint="give a .gstalk file made by `gstalk export`, or a workspace", path=label) from None
    with z:
        names = set(z.namelist())
        if BUNDLE_JSON not in names:
            raise InputError(f"{label} is a zip archive but not a gstalk avatar bundle (no {BUNDLE_JSON}).",
                             hint="give a .gstalk file made by `gstalk export`", path=label)

        def read(name: str, limit: int) -> bytes:
            zi = z.getinfo(name)
            if zi.compress_type != zipfile.ZIP_STORED:
                raise InputError(f"Avatar bundle {label}: {name} is compressed; gstalk bundles store their members "
                                 "uncompressed (a foreign or repacked archive).", hint=_REEXPORT, path=label)
            if zi.file_size > limit:
                raise InputError(f"Avatar bundle {label}: {name} claims {zi.file_size} bytes, more than a bundle "
                                 f"member may hold ({limit}).", hint=_REEXPORT, path=label)
            try:
                return z.read(name)
            except (zipfile.BadZipFile, EOFError, OSError) as exc:  # CRC mismatch, cut short
                raise InputError(f"Avatar bundle {label} is damaged: {name} cannot be read ({exc}).",
                                 hint=_REEXPORT, path=label) from None

        raw = read(BUNDLE_JSON, MAX_JSON_BYTES)
        info = _parse_info(raw, label)
        members = {}
        for name in MEMBERS:
            if name not in names:
                raise InputError(f"Avatar bundle {label} is damaged: {name} is missing.", hint=_REEXPORT, path=label)
            members[name] = read(name, MAX_MEMBER_BYTES)
    _verify(info, members, label)
    return Bundle(path=label, info=info, members=members, info_bytes=raw)


def _read_folder(p: Path) -> Bundle:
    j = p / BUNDLE_JSON
    if not j.is_file() and (p / "manifest.json").is_file():
        raise InputError(f"{p} is a workspace, not an avatar bundle.",
                         hint=f"`gstalk export {p}` makes a bundle of it; `gstalk check {p}` verifies a workspace",
                         path=p)
    if not j.is_file():
        raise InputError(f"{p} is a folder but neither an unpacked avatar bundle (no {BUNDLE_JSON}) nor a workspace.",
                         hint="give a .gstalk file, a folder made by `gstalk import`, or a workspace", path=p)
    raw = j.read_bytes()
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{j} is {len(raw)} bytes: not a gstalk bundle.json.", path=j)
    info = _parse_info(raw, str(p))
    members = {}
    for name in MEMBERS:
        f = p / name
        if not f.is_file():
            raise InputError(f"Avatar bundle {p} is damaged: {name} is missing.", hint=_REEXPORT, path=p)
        members[name] = f.read_bytes()
    _verify(info, members, str(p))
    return Bundle(path=str(p), info=info, members=members, info_bytes=raw)


def _parse_info(raw: bytes, label: str) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"Avatar bundle {label} is damaged: {BUNDLE_JSON} is not valid JSON ({exc}).",
                         hint=_REEXPORT, path=label) from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        what = info.get("format") if isinstance(info, dict) else None
        raise InputError(f"{label} is not a gstalk avatar bundle ({BUNDLE_JSON} says format {what!r}, not "
                         f"{BUNDLE_FORMAT!r}).", hint="give a .gstalk file made by `gstalk export`", path=label)
    version = info.get("bundle_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"Avatar bundle {label} is damaged: {BUNDLE_JSON} has no valid bundle_version.",
                         hint=_REEXPORT, path=label)
    if version > BUNDLE_VERSION:
        raise InputError(f"Avatar bundle {label} is version {version} (made by gstalk "
                         f"{info.get('gstalk_version', '?')}), newer than this gstalk {__version__} reads "
                         f"({BUNDLE_VERSION}).", hint="upgrade gstalk (pip install -U gstalk)", path=label)
    files = info.get("files")
    if not isinstance(files, dict) or not all(isinstance(files.get(m), dict) for m in MEMBERS):
        raise InputError(f"Avatar bundle {label} is damaged: {BUNDLE_JSON} does not list its members' checksums.",
                         hint=_REEXPORT, path=label)
    return info


def _verify(info: dict[str, Any], members: dict[str, bytes], label: str) -> None:
    for name, data in members.items():
        want = info["files"][name]
        if want.get("bytes") != len(data):
            raise InputError(f"Avatar bundle {label} is damaged or truncated: {name} has {len(data)} bytes, "
                             f"{BUNDLE_JSON} lists {want.get('bytes')}.", hint=_REEXPORT, path=label)
        if want.get("sha256") != hashlib.sha256(data).hexdigest():
            raise InputError(f"Avatar bundle {label} is damaged: {name} does not match its SHA-256 checksum.",
                             hint=_REEXPORT, path=label)


# --------------------------------------------------------------------------- import / inspect
def inspect_bundle(path: str | Path) -> dict[str, Any]:
    """``gstalk inspect``: verify a bundle (checksums, and that its avatar decodes and its
    model builds) and describe it (:meth:`Bundle.summary`, with the file's ``bytes``).

    Raises:
        InputError: as :func:`read_bundle` and :meth:`Bundle.avatar`.
    """
    b = read_bundle(path)
    b.avatar()
    p = Path(path)
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else p.stat().st_size
    return {**b.summary(), "bytes": size}


def import_bundle(path: str | Path, dest: str | Path | None = None, *, force: bool = False) -> dict[str, Any]:
    """``gstalk import``: verify a bundle completely and unpack it into a folder (atomically)
    that ``render``, ``batch`` and ``serve`` accept like the bundle itself.

    Args:
        path: the bundle file.
        dest: the folder to create (default: the bundle's name without ``.gstalk``, in the
            current folder).
        force: replace an existing folder that holds another bundle.

    Returns:
        The bundle's summary, with ``unpacked_to`` and ``unchanged`` (the same bundle was
        there already).

    Raises:
        InputError: a bad bundle (nothing is written). UsageError: ``dest`` exists and is not
        the same bundle (without ``force``), or is a workspace or another folder.
    """
    b = read_bundle(path)
    b.avatar()  # decodes and builds: a bundle that would not render is not unpacked
    out = Path(dest) if dest is not None else Path(Path(path).stem)
    old = out / BUNDLE_JSON
    if out.exists():
        if old.is_file() and old.read_bytes() == b.info_bytes and not _changed(out, b):
            return {**b.summary(), "unpacked_to": str(out), "unchanged": True}
        if not out.is_dir() or (not old.is_file() and any(out.iterdir())):
            raise UsageError(f"{out} exists and is not an unpacked avatar bundle.",
                             hint="give another folder: gstalk import FILE -o NEW_FOLDER")
        if old.is_file() and not force:
            raise UsageError(f"{out} holds another avatar bundle (or a damaged copy).",
                             hint="add --force to replace it, or give -o another folder")
    with atomic_dir(out) as tmp:
        (tmp / BUNDLE_JSON).write_bytes(b.info_bytes)
        for name, data in b.members.items():
            (tmp / name).write_bytes(data)
    return {**b.summary(), "unpacked_to": str(out), "unchanged": False}


def _changed(folder: Path, b: Bundle) -> bool:
    """True when an unpacked folder's members differ from bundle ``b``'s."""
    for name, data in b.members.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != len(data) or f.read_bytes() != data:
            return True
    return False


def bundle_table(s: dict[str, Any]) -> Any:
    """:func:`inspect_bundle` / :func:`import_bundle`'s result as a rich Table (what ``gstalk
    inspect`` and ``gstalk import`` print)."""
    from rich.markup import escape
    from rich.table import Table

    a, p = s.get("avatar") or {}, s.get("provenance") or {}
    t = Table(title=f"avatar bundle {escape(str(s['bundle']))}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    ev = p.get("eval") or {}
    rows = [
        ("name", s.get("name")), ("sha256", s.get("sha256")),
        ("format", f"{s.get('format')} v{s.get('bundle_version')}, made by gstalk {s.get('gstalk_version')} "
                   f"on {s.get('created')}"),
        ("model", f"{a.get('model')}: {a.get('n_gaussians')} head + {a.get('n_torso_gaussians')} torso Gaussians"),
        ("video", f"{a.get('size')} px, {a.get('fps')} fps, {a.get('n_frames')} pose frames"),
        ("audio features", ", ".join(f"{k} {v}" for k, v in (a.get("audio_features") or {}).items())),
        ("trained from", f"{p.get('source_name')} (sha256 {str(p.get('source_sha256'))[:16]}...), preset "
                         f"{p.get('preset')}, seed {p.get('seed')}, gstalk {p.get('trained_with')}"),
        ("eval", ", ".join(f"{k} {ev[k]:.2f}" for k in ("psnr", "mouth_psnr", "lmd") if isinstance(ev.get(k), float))
         or "none in the workspace"),
        ("files", ", ".join(f"{k} ({v.get('bytes')} B)" for k, v in (s.get("files") or {}).items())),
        ("verified", "all checksums match; the model builds"),
    ]
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    return t
