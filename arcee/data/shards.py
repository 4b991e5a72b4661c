"""LMDB shards: building them from images, the manifest, checksums, verification.

A dataset folder::

    manifest.json              written last: the dataset is complete once it exists; per shard its
                               records and ``data_mdb_bytes`` (checked before mapping: see open_env)
    shard_0000.lmdb/data.mdb   keys b"0" .. b"{n-1}" (local to the shard), b"__len__", b"__metadata__"
    shard_0000.lmdb/index.json the shard's records (source names, labels, sha256 of each value)
    ...

Record values (``manifest["format"]``): ``raw`` (uint8 HWC bytes, the anchor's layout), ``png`` or
``jpeg`` (encoded HWC images; JPEG 4:4:4 at ``jpeg_quality``), or ``fp16`` (latent statistics ``(k, C, h, w)``, see ``vae.py``).
Global record ``i`` lives in the shard whose cumulative count range holds ``i``.

Guarantees: a shard directory appears only when complete (written as ``*.lmdb.tmp``, then
renamed); re-running a build skips finished shards; the same sources and settings give
byte-identical ``data.mdb``, ``index.json`` and ``manifest.json`` files on the same platform
(LMDB's file layout depends on the OS page size and the liblmdb version, and so does the file size
the manifest records; the records do not). Determinism comes from a sorted source order, records committed in fixed
groups of ``TXN_RECORDS`` in that order, a map size that depends only on the plan, and LMDB's
zero-filling of unused page space (``meminit``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import lmdb
import numpy as np
from filelock import FileLock
from PIL import Image, ImageOps
from tqdm import tqdm

from arcee.errors import UserError
from arcee.io import atomic_write_bytes

MANIFEST = "manifest.json"
PLAN = "build_plan.json"
FORMAT_VERSION = 1
TXN_RECORDS = 256
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
PIXEL_FORMATS = ("raw", "png", "jpeg")
RESIZE = "shorter side to size (PIL bicubic, antialiased), center crop; alpha over white"


class ShardError(UserError):
    """A shard is missing, unreadable or disagrees with its manifest."""


# ----------------------------------------------------------------------------- small helpers


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def read_manifest(root: str | os.PathLike) -> dict:
    """Read ``root/manifest.json``; clear errors for a missing folder, unfinished build or bad JSON."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        hint = " (an unfinished build: re-run the same build command to resume)" if (root / PLAN).exists() else ""
        raise FileNotFoundError(
            f"{str(path)!r} not found: {str(root)!r} is not a finished shard folder{hint}; "
            f"create one with `python -m data_prep build SRC_DIR {root} --size N`"
        )
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    missing = [k for k in ("count", "kind", "format", "shape", "shards") if k not in m]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the fields {missing}")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format_version {m['format_version']}; this arcee reads <= {FORMAT_VERSION}")
    if sum(s["count"] for s in m["shards"]) != m["count"]:
        raise ValueError(f"{str(path)!r} is inconsistent: shard counts do not sum to count={m['count']}")
    return m


_OPEN: dict[str, tuple[tuple[int, int], lmdb.Environment, int]] = {}
_OPEN_PID = os.getpid()


def _truncated(path, size: int, need: int, by: str) -> ShardError:
    return ShardError(f"shard {str(path)!r} is truncated: data.mdb has {size} bytes but {by} {need} "
                      f"(a damaged or partial copy; reading it would crash the process with SIGBUS)")


def open_env(path: str | os.PathLike, expected_bytes: int | None = None) -> lmdb.Environment:
    """Shard ``path`` opened read-only without a lock file, once per process.

    py-lmdb refuses to open the same files twice in one process, so every dataset and check in
    a process shares one handle per shard. A forked child closes the handles it inherited (a
    parent's LMDB handle must not be used after fork) and opens its own.

    Every call checks the size of ``data.mdb`` (raising ``ShardError``) against the pages its
    LMDB header says are in use and against ``expected_bytes`` (the manifest's
    ``data_mdb_bytes``, recorded at build time): a truncated file is memory-mapped beyond its
    end, and reading there kills the process with SIGBUS instead of raising.
    """
    global _OPEN_PID
    if _OPEN_PID != os.getpid():
        for _, env, _ in _OPEN.values():
            try:
                env.close()
            except lmdb.Error:
                pass
        _OPEN.clear()
        _OPEN_PID = os.getpid()
    data = Path(path) / "data.mdb"
    try:
        st = data.stat()
    except OSError:
        raise ShardError(f"shard {str(path)!r} is missing (no data.mdb)") from None
    if expected_bytes is not None and st.st_size < expected_bytes:
        raise _truncated(path, st.st_size, expected_bytes, "manifest.json recorded")
    key, ident = os.path.realpath(path), (st.st_dev, st.st_ino)
    if key in _OPEN and _OPEN[key][0] != ident:
        _OPEN.pop(key)[1].close()  # the shard was rebuilt since: drop the stale handle
    if key not in _OPEN:
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)
        except lmdb.Error as e:
            raise ShardError(f"cannot open shard {str(path)!r}: {e}") from e
        # the header (meta pages, read with pread by lmdb.open) names the last page in use
        _OPEN[key] = (ident, env, (env.info()["last_pgno"] + 1) * env.stat()["psize"])
    _, env, need = _OPEN[key]
    if st.st_size < need:
        raise _truncated(path, st.st_size, need, "its LMDB header says the pages in use take")
    return env


def shard_header_problem(txn, count: int, manifest: dict) -> str | None:
    """Compare a shard's ``__len__`` and ``__metadata__`` with the manifest; a message, or None if they agree."""
    n, meta = txn.get(b"__len__"), txn.get(b"__metadata__")
    n = None if n is None else bytes(n).decode(errors="replace")
    if n != str(count):
        return f"holds {n} records but manifest.json says {count}: mismatched shard, rebuild it"
    try:
        meta = json.loads(bytes(meta))
    except (TypeError, ValueError):
        return "has no readable __metadata__ record"
    if meta.get("shape") != manifest["shape"] or meta.get("format") != manifest["format"]:
        return (f"holds {meta.get('format')} records of shape {meta.get('shape')} but manifest.json says "
                f"{manifest['format']} {manifest['shape']}: mismatched shard, rebuild it")
    return None


# ----------------------------------------------------------------------------- images -> values


def load_image(src: str | np.ndarray, size: int, channels: int) -> np.ndarray:
    """Load a file (or take an array), resize the shorter side to ``size``, center crop.

    Returns uint8 ``(size, size, channels)``; ``channels`` 3 = RGB, 1 = grayscale. EXIF
    orientation is applied; transparent pixels are composited over white.
    """
    img = Image.open(src) if not isinstance(src, np.ndarray) else Image.fromarray(src)
    with img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L"):  # 16-bit grayscale: keep the top 8 bits' worth
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().astype(np.uint8))
        if img.mode == "P" or "A" in img.mode or "a" in img.mode:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB" if channels == 3 else "L")
        w, h = img.size
        if (w, h) != (size, size):
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def encode_image(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """uint8 HWC -> stored bytes."""
    if fmt == "raw":
        return np.ascontiguousarray(arr).tobytes()
    buf = io.BytesIO()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: no chroma subsampling
    return buf.getvalue()


def decode_value(buf, manifest: dict) -> np.ndarray:
    """Stored bytes -> array: uint8 HWC for images, float16 ``(k, C, h, w)`` for latents.

    Raises ``ValueError`` when the bytes do not decode to ``manifest["shape"]``.
    """
    fmt, shape = manifest["format"], tuple(manifest["shape"])
    if fmt in ("raw", "fp16"):
        dtype = np.uint8 if fmt == "raw" else np.float16
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if len(buf) != expected:
            raise ValueError(f"value has {len(buf)} bytes, expected {expected} for shape {list(shape)} ({fmt})")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"unknown record format {fmt!r}")
    try:
        with Image.open(io.BytesIO(buf)) as img:
            arr = np.asarray(img)
    except (OSError, SyntaxError) as e:
        msg = "unrecognised or damaged data" if "BytesIO" in str(e) else str(e)
        raise ValueError(f"does not decode as {fmt}: {msg}") from e
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape != shape or arr.dtype != np.uint8:
        raise ValueError(f"decoded image has shape {list(arr.shape)} {arr.dtype}, expected {list(shape)} uint8")
    return arr


def _prepare(item, size: int, channels: int, fmt: str, quality: int):
    """Pool worker: (name, label, src) -> (name, label, value | None, sha256 | None, error | None)."""
    name, label, src = item
    try:
        value = encode_image(load_image(src, size, channels), fmt, quality)
    except Exception as e:  # any unreadable/corrupt input is reported, never fatal here
        return name, label, None, None, f"{type(e).__name__}: {e}"
    return name, label, value, sha256(value), None


# ----------------------------------------------------------------------------- sources


def scan_folder(src: str | os.PathLike, labels: str = "none") -> tuple[list[tuple[str, int, str]], list[str]]:
    """Image files under ``src`` (recursive, sorted by relative path, hidden files skipped).

    ``labels="subdir"`` takes the class from the first folder level (classes sorted by name).
    Returns ``([(relative_name, label, absolute_path), ...], class_names)``.
    """
    root = Path(src).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"source folder {str(src)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"source {str(src)!r} is not a folder")
    if labels not in ("none", "subdir"):
        raise ValueError(f"labels must be 'none' or 'subdir', got {labels!r}")
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        names += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    names.sort()
    if not names:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTS)}) found under {str(src)!r}")
    class_names: list[str] = []
    if labels == "subdir":
        flat = [n for n in names if "/" not in n]
        if flat:
            raise ValueError(f"labels='subdir' needs every image inside a class folder; {flat[0]!r} is not")
        class_names = sorted({n.split("/", 1)[0] for n in names})
    index = {c: i for i, c in enumerate(class_names)}
    return [(n, index.get(n.split("/", 1)[0], 0), str(root / n)) for n in names], class_names


# ----------------------------------------------------------------------------- writing


def _map_size(n: int, max_value_bytes: int) -> int:
    """LMDB map size from the plan only (it is stored in the file, so it must be deterministic)."""
    per_record = max_value_bytes + 2 * 4096 + 64
    return (((2 * n * per_record) >> 20) + 64) << 20


def write_shard(final: Path, records: Iterable[tuple], metadata: dict, map_size: int,
                strict: bool = False, progress: tqdm | None = None) -> dict:
    """Write ``records`` = ``(source, label, value | None, sha256 | None, error | None)`` as one shard.

    Written to ``final + ".tmp"`` then renamed, so ``final`` exists only when complete. Records
    with an error are skipped (``strict``: raise ``ValueError`` naming the source). Returns the
    shard index ``{"sources", "labels", "sha256", "skipped"}`` (also saved as ``index.json``).
    """
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    index = {"sources": [], "labels": [], "sha256": [], "skipped": []}
    env = lmdb.open(str(tmp), map_size=map_size, subdir=True, lock=False, readahead=False, meminit=True)
    txn = env.begin(write=True)
    try:
        for source, label, value, digest, error in records:
            if progress is not None:
                progress.update(1)
            if error is not None:
                if strict:
                    raise ValueError(f"cannot read image {source!r}: {error} (drop --strict to skip such files)")
                index["skipped"].append({"source": source, "error": error})
                continue
            txn.put(str(len(index["sources"])).encode(), value)
            index["sources"].append(source)
            index["labels"].append(int(label))
            index["sha256"].append(digest)
            if len(index["sources"]) % TXN_RECORDS == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.put(b"__len__", str(len(index["sources"])).encode())
        txn.put(b"__metadata__", dump_json(metadata))
        txn.commit()
        env.sync(True)
    except lmdb.MapFullError as e:
        txn.abort()
        raise ShardError(f"shard {str(tmp)!r} outgrew its LMDB map ({map_size} bytes): {e}") from e
    except BaseException:
        txn.abort()
        raise
    finally:
        env.close()
    atomic_write_bytes(tmp / "index.json", dump_json(index))
    os.replace(tmp, final)
    return index


def run_build(out: Path, plan: dict, num_shards: int, shard_records: Callable[[int], Iterator[tuple]],
              header: dict, map_size: int, strict: bool = False, total: int | None = None,
              progress: bool = True, sizes: Sequence[int] | None = None) -> dict:
    """Resumable, locked build of ``num_shards`` shards and the manifest into ``out``.

    ``shard_records(s)`` yields shard ``s``'s records (see ``write_shard``). ``plan`` (settings and
    sources) must match any unfinished or finished build already in ``out``. Returns the manifest.
    """
    out.mkdir(parents=True, exist_ok=True)
    plan_bytes = dump_json(plan)
    plan_sha = sha256(plan_bytes)
    with FileLock(str(out / ".build.lock")):
        if (out / MANIFEST).exists():
            m = read_manifest(out)
            if m.get("plan_sha256") != plan_sha:
                raise ValueError(f"{str(out)!r} already holds a finished dataset built from other sources or "
                                 f"settings; choose another output folder or delete it")
            return m
        if (out / PLAN).exists() and (out / PLAN).read_bytes() != plan_bytes:
            raise ValueError(f"{str(out)!r} holds an unfinished build with other sources or settings "
                             f"(see {PLAN}); choose another output folder or delete it")
        atomic_write_bytes(out / PLAN, plan_bytes)
        bar = tqdm(total=total, desc=f"build {out.name}", unit="img", disable=None if progress else True)
        shards = []
        for s in range(num_shards):
            final = out / f"shard_{s:04d}.lmdb"
            if (final / "index.json").is_file():  # finished in an earlier run
                index = json.loads((final / "index.json").read_text())
                bar.update(sizes[s] if sizes else 0)
            else:
                index = write_shard(final, shard_records(s), header["shard_metadata"], map_size, strict, bar)
            shards.append({"name": final.name, "count": len(index["sources"]), **index,
                           "data_mdb_bytes": (final / "data.mdb").stat().st_size})
        bar.close()
        skipped = [k for s in shards for k in s.pop("skipped")]
        count = sum(s["count"] for s in shards)
        if count == 0:
            raise ValueError(f"no readable images: all {len(skipped)} inputs failed "
                             f"(first: {skipped[0]['source']!r}: {skipped[0]['error']})" if skipped else "no records")
        manifest = {k: v for k, v in header.items() if k != "shard_metadata"}
        manifest.update(format_version=FORMAT_VERSION, count=count, shards=shards, skipped=skipped,
                        plan_sha256=plan_sha)
        atomic_write_bytes(out / MANIFEST, dump_json(manifest))
        (out / PLAN).unlink()
    if skipped:
        first = ", ".join(f"{k['source']!r} ({k['error']})" for k in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) (listed under 'skipped' in "
                      f"{out / MANIFEST}): {first}{' ...' if len(skipped) > 3 else ''}", stacklevel=2)
    return manifest


def build_shards(sources: Sequence[tuple[str, int, str | np.ndarray]], out_dir: str | os.PathLike, *,
                 size: int, channels: int = 3, fmt: str = "raw", num_shards: int | None = None,
                 shard_size_mb: float | None = None, workers: int | None = None, strict: bool = False,
                 quality: int = 95, class_names: Sequence[str] = (), progress: bool = True) -> dict:
    """Images -> LMDB shards of ``size x size x channels`` records in ``out_dir``; returns the manifest.

    ``sources``: ``(name, label, path_or_uint8_array)`` in the order to store them (names unique).
    ``num_shards`` (default: from ``shard_size_mb``, itself 1024 by default, using the raw record
    size) contiguous shards. ``workers`` decoding processes (default: all cores; 0 = in-process).
    """
    if size < 1 or channels not in (1, 3):
        raise ValueError(f"size must be >= 1 and channels 1 or 3; got size={size}, channels={channels}")
    if fmt not in PIXEL_FORMATS:
        raise ValueError(f"format must be one of {PIXEL_FORMATS}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be in [1, 100], got {quality}")
    n = len(sources)
    if n == 0:
        raise ValueError("no images to build from")
    names = [s[0] for s in sources]
    if len(set(names)) != n:
        raise ValueError("source names must be unique")
    raw_bytes = size * size * channels
    if num_shards is None:
        num_shards = max(1, int(np.ceil(n * raw_bytes / ((shard_size_mb or 1024) * 2**20))))
    num_shards = min(int(num_shards), n)
    if num_shards < 1:
        raise ValueError(f"shards must be >= 1, got {num_shards}")
    chunks = np.array_split(np.arange(n), num_shards)
    settings = {"kind": "pixel", "resolution": size, "channels": channels, "format": fmt,
                "num_shards": num_shards, "resize": RESIZE, **({"jpeg_quality": quality} if fmt == "jpeg" else {})}
    plan = {"settings": settings, "sources": [[s[0], int(s[1])] for s in sources]}
    shape = [size, size, channels]
    header = {"kind": "pixel", "resolution": size, "channels": channels, "format": fmt, "shape": shape,
              "num_classes": len(class_names), "class_names": list(class_names), "settings": settings,
              "shard_metadata": {"shape": shape, "format": fmt}}
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    fn = partial(_prepare, size=size, channels=channels, fmt=fmt, quality=quality)
    pool = Pool(workers) if workers > 1 else None
    try:
        def shard_records(s):
            items = [sources[i] for i in chunks[s]]
            if pool is None:
                return map(fn, items)
            return pool.imap(fn, items, chunksize=max(1, min(16, len(items) // (4 * workers))))

        return run_build(Path(out_dir).expanduser(), plan, num_shards, shard_records, header,
                         _map_size(max(map(len, chunks)), raw_bytes + 1024), strict, n, progress,
                         [len(c) for c in chunks])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


# ----------------------------------------------------------------------------- checking


def verify_shards(root: str | os.PathLike, progress: bool = True) -> list[str]:
    """Re-read every record: present, checksum, decode, shape. Returns the problems found (empty = ok),
    one per damaged record (plus one per shard whose file or header is bad)."""
    root = Path(root)
    m = read_manifest(root)
    problems = []
    bar = tqdm(total=m["count"], desc=f"verify {root.name}", unit="rec", disable=None if progress else True)
    for s in m["shards"]:
        where = f"{s['name']}"
        try:
            env = open_env(root / s["name"], s.get("data_mdb_bytes"))
            with env.begin(buffers=True) as txn:
                header = shard_header_problem(txn, s["count"], m)
            entries = env.stat()["entries"]
        except (ShardError, lmdb.Error) as e:
            problems.append(f"{where}: {e} ({s['count']} records lost)")
            bar.update(s["count"])
            continue
        if header:
            problems.append(f"{where}: {header}")
        if entries - s["count"] - 2:
            problems.append(f"{where}: {entries - s['count'] - 2:+d} keys compared with the manifest's "
                            f"{s['count']} records")
        for k in range(s["count"]):
            bar.update(1)
            problem = _record_problem(env, k, s["sha256"][k], m)
            if problem:
                problems.append(f"{where} key '{k}' (source {s['sources'][k]!r}): {problem}")
    bar.close()
    return problems


def _record_problem(env: lmdb.Environment, k: int, digest: str, manifest: dict) -> str | None:
    """What is wrong with record ``k`` (missing, unreadable, checksum, decode), or None.

    Each record is read in its own transaction: LMDB marks a transaction that met a corrupt page
    as failed (every later get gives MDB_BAD_TXN), which would report every following record.
    """
    try:
        with env.begin() as txn:
            buf = txn.get(str(k).encode())
    except lmdb.Error as e:
        return f"unreadable: {e}"
    if buf is None:
        return "missing"
    if sha256(buf) != digest:
        return "checksum mismatch (stored bytes changed)"
    try:
        decode_value(buf, manifest)
    except Exception as e:  # any decoder failure is a finding about this record
        return f"does not decode: {e}"
    return None
