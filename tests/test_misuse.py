"""Damaged data and user mistakes (issue 13): a truncated shard fails with its path and the verify
command instead of SIGBUS; verify reports the damaged records, not a cascade; sample folders hold
and are scored by exactly what sampling.json lists; bad inputs to train.py / sample.py /
evaluate.py / data_prep print one to three lines on stderr and exit 2.

Anything that could die of SIGBUS runs in a subprocess, so a regression fails the test instead of
killing pytest.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from arcee.data import ShardedLMDBDataset, build_shards, verify_shards
from arcee.sample import ImageSampler, sample_folder, save_generator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_metrics import Feats  # noqa: E402
from test_sample import tiny_cfg, tiny_model  # noqa: E402


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**e, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT / "tests"), **extra}


def run(*cmd, **extra):
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env(**extra), capture_output=True,
                          text=True, timeout=180)


def random_sources(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"img{i:04d}", 0, rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(n)]


def build(root, n=300, shards=2):
    build_shards(random_sources(n), root, size=8, num_shards=shards, fmt="raw", workers=0, progress=False)
    return root


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """A shard folder whose second data.mdb lost its second half (a partial copy); and the same
    with a manifest from before `data_mdb_bytes` was recorded (only the LMDB header check is left)."""
    base = tmp_path_factory.mktemp("truncated")
    root = build(base / "ds")
    data = root / "shard_0001.lmdb" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    old = base / "ds_old_manifest"
    shutil.copytree(root, old)
    m = json.loads((old / "manifest.json").read_text())
    for s in m["shards"]:
        del s["data_mdb_bytes"]
    (old / "manifest.json").write_text(json.dumps(m))
    return root, old


# ----------------------------------------------------------------------------- truncated shards


def test_truncated_shard_dataset_open_fails_with_its_path(truncated):
    root, old = truncated
    code = ("import sys\nfrom arcee.data import build_dataset\n"
            "for root in sys.argv[1:]:\n"
            "    try:\n"
            "        ds = build_dataset({'name': 'folder', 'path': root})\n"
            "        [ds[i] for i in range(len(ds))]\n"
            "        print('read everything')\n"
            "    except Exception as e:\n"
            "        print(f'{type(e).__name__}: {e}')\n")
    r = run("-c", code, root, old)
    assert r.returncode != -signal.SIGBUS, "SIGBUS: a truncated shard was mapped"
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    for line, root, by in zip(lines, (root, old), ("manifest.json recorded", "its LMDB header says")):
        assert line.startswith(f"ShardError: shard '{root / 'shard_0001.lmdb'}' is truncated"), line
        assert by in line and f"run `python -m data_prep verify {root}`" in line, line


def test_truncated_shard_verify_and_real_samples(truncated, tmp_path):
    root, old = truncated
    for folder in (root, old):
        r = run("-m", "data_prep", "verify", folder, "--quiet")
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and "shard_0001.lmdb: shard" in r.stderr and "is truncated" in r.stderr
        assert "(150 records lost)" in r.stderr and r.stdout.strip().endswith("FAILED, 1 problem(s)")
    r = run("-m", "data_prep", "real-samples", root, tmp_path / "real", "--quiet")
    assert r.returncode == 2, (r.returncode, r.stderr)
    first, hint = r.stderr.splitlines()
    assert first.startswith("error: shard ") and "shard_0001.lmdb' is truncated" in first
    assert f"python -m data_prep verify {root}" in first and "--debug" in hint
    assert not (tmp_path / "real").exists()


# ----------------------------------------------------------------------------- verify: damaged records only


def test_verify_reports_the_records_of_a_zeroed_page(tmp_path):
    """Zero one LMDB page holding records; verify must name exactly the records stored on that page
    (found independently: where each record's bytes lie in the intact file), nothing after it."""
    n = 600
    root = build(tmp_path / "ds", n=n, shards=1)
    shard, data = root / "shard_0000.lmdb", root / "shard_0000.lmdb" / "data.mdb"
    # LMDB's compacting copy keeps only live pages: every record's bytes then occur once in the file
    env = lmdb.open(str(shard), readonly=True, lock=False)
    env.copy(str(tmp_path), compact=True)
    env.close()
    os.replace(tmp_path / "data.mdb", data)
    m = json.loads((root / "manifest.json").read_text())
    m["shards"][0]["data_mdb_bytes"] = data.stat().st_size
    (root / "manifest.json").write_text(json.dumps(m))
    assert verify_shards(root, progress=False) == []
    raw = data.read_bytes()
    page = 4096
    values = [np.ascontiguousarray(a).tobytes() for _, _, a in random_sources(n)]
    where = [raw.find(v) // page for v in values]
    assert all(raw.find(v) >= 0 and raw.find(v, raw.find(v) + 1) < 0 for v in values)
    target = where[n // 2]  # a leaf page in the middle of the file
    expected = {i for i, p in enumerate(where) if p == target}
    assert 2 <= len(expected) < 40
    with open(data, "r+b") as f:
        f.seek(target * page)
        f.write(bytes(page))
    problems = verify_shards(root, progress=False)
    named = {int(p.split("key '")[1].split("'")[0]) for p in problems}
    assert named == expected and len(problems) == len(expected), problems[:3]
    assert all(": unreadable: " in p or "checksum mismatch" in p for p in problems)


# ----------------------------------------------------------------------------- sample folders and their manifest


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    cfg = tiny_cfg()
    path = tmp_path_factory.mktemp("export") / "g.safetensors"
    save_generator(path, tiny_model(cfg).state_dict(), cfg, step=7)
    return path


def add_foreign_images(folder):
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for name in ("cat.png", "sub/dog.png"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)


def test_evaluate_scores_exactly_the_listed_samples(tmp_path, export, capsys):
    from arcee.metrics import Evaluator
    from arcee.sample import load_generator

    model, cfg = load_generator(export)
    rng = np.random.default_rng(1)
    (tmp_path / "real").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "real" / f"{i}.png")
    clean = tmp_path / "clean"
    sample_folder(ImageSampler(model, cfg, steps=2), clean, 8, batch_size=8, progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(clean, mixed)
    add_foreign_images(mixed)
    ev = Evaluator(tmp_path / "real", feature_extractor=Feats(), resize=False, cache_dir=tmp_path / "cache",
                   device="cpu", num_workers=0)
    ev.verbose = True
    a, b = ev.folder(clean), ev.folder(mixed)
    assert a["num_samples"] == b["num_samples"] == 8 and a["fid"] == b["fid"] and np.isfinite(a["fid"])
    assert "scoring the 8 images sampling.json lists; ignoring 2 other image(s) (cat.png, sub/dog.png)" in \
        capsys.readouterr().err
    os.remove(mixed / "sampling.json")  # not a sample.py folder: everything under it, and it says so
    assert ev.folder(mixed)["num_samples"] == 10
    assert "has no sampling.json: scoring all 10 images found under it (recursive)" in capsys.readouterr().err
    os.remove(clean / "000003.png")
    with pytest.raises(ValueError, match="incomplete: sampling.json lists 8 images but 1 are missing"):
        ev.folder(clean)
    foreign = tmp_path / "foreign"
    add_foreign_images(foreign)
    with pytest.raises(ValueError, match=r"holds 2 file\(s\) or folder\(s\) sample.py does not write \(cat.png, sub\)"):
        sample_folder(ImageSampler(model, cfg), foreign, 4, progress=False)
    assert sorted(os.listdir(foreign)) == ["cat.png", "sub"]


def test_zero_and_other_falsy_sampler_settings_are_rejected(export):
    from arcee.sample import load_generator

    model, cfg = load_generator(export)
    for kw, key in ((dict(steps=0), "steps"), (dict(atol=0.0), "atol"), (dict(rtol=0), "rtol"),
                    (dict(sampler=""), "sampler"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=f"^{key} must be"):
            ImageSampler(model, cfg, **kw)
    assert ImageSampler(model, cfg, steps=1).solver["steps"] == 1


# ----------------------------------------------------------------------------- bad inputs: one to three lines, exit 2


@pytest.fixture(scope="module")
def scene(tmp_path_factory, export, truncated):
    """Files the bad inputs point at."""
    d = tmp_path_factory.mktemp("scene")
    add_foreign_images(d / "foreign")
    (d / "afile").write_text("x")
    (d / "real").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "real" / "0.png")
    return {"d": d, "export": export, "truncated": truncated[0]}


TRAIN = ["train.py", "logger=disabled", "hydra.run.dir={d}/run"]
SAMPLE = ["sample.py", "ckpt={export}", "out_dir={d}/out", "num_samples=4", "progress=false"]
EVALUATE = ["evaluate.py", "samples={d}/foreign", "real={d}/real", "feature_extractor=test_metrics:Feats",
            "resize=false", "device=cpu", "num_workers=0", "cache_dir={d}/cache", "out={d}/table"]
# (command, what stderr must name); every case fails before any real work
BAD_INPUTS = [
    (TRAIN + ["train.max_stepz=1"], "train.max_stepz"),
    (TRAIN + ["train.mixed_precision=bf17"], "expected one of [no, bf16, fp16]"),
    (TRAIN + ["model=nope"], "Available options in 'model'"),
    (TRAIN + ["train.max_steps=0"], "train.max_steps must be an integer >= 1"),
    (TRAIN + ["data=folder", "data.path={truncated}", "data.image_size=8"], "shard_0001.lmdb' is truncated"),
    (SAMPLE + ["steps=0"], "steps must be an integer >= 1"),
    (SAMPLE + ["num_samples=abc"], "num_samples: Value 'abc'"),
    (["sample.py", "out_dir={d}/out"], "ckpt is required"),
    (SAMPLE[:2] + ["out_dir={d}/foreign"], "sample.py does not write (cat.png, sub)"),
    (EVALUATE + ["feature_extractor=no_such_module:Net"], "cannot import module 'no_such_module'"),
    (EVALUATE + ["out={d}/afile/table"], "out="),
    (EVALUATE + ["samples={d}/nowhere"], "samples: folder"),
    (["-m", "data_prep", "verify", "{d}/nowhere"], "does not exist"),
    (["-m", "data_prep", "build", "{d}/foreign", "{d}/built", "--size", "0"], "size must be >= 1"),
    (["-m", "data_prep", "real-samples", "{truncated}", "{d}/real2"], "data_prep verify"),
]


def test_bad_inputs_print_one_to_three_lines_and_exit_2(scene):
    cases = [[a.format(**scene) for a in cmd] for cmd, _ in BAD_INPUTS]
    with ThreadPoolExecutor(2) as pool:  # two at a time: start-up dominates, 2 cores
        results = list(pool.map(lambda cmd: run(*cmd), cases))
    for (cmd, expected), r in zip(BAD_INPUTS, results):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and 1 <= len(lines) <= 3 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert expected.format(**scene) in r.stderr, (cmd, r.stderr)
        assert lines[-1].endswith("shows the traceback)") and lines[-2].startswith("error: "), (cmd, r.stderr)
    assert not (scene["d"] / "out").exists() and not (scene["d"] / "real2").exists()
    assert sorted(os.listdir(scene["d"] / "foreign")) == ["cat.png", "sub"]
    # the traceback on request
    r = run(*cases[5], HYDRA_FULL_ERROR="1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "steps must be an integer >= 1" in r.stderr
    r = run(*cases[-3], "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_evaluate_keeps_the_table_when_out_fails_late(tmp_path, monkeypatch, export):
    """out= passed the check before scoring but the write fails at the end (disk full): the rows are
    written to a temporary folder and the error says where."""
    import importlib.util

    import arcee.metrics
    from arcee.sample import load_generator

    model, cfg = load_generator(export)
    sample_folder(ImageSampler(model, cfg, steps=2), tmp_path / "s", 8, batch_size=8, progress=False)
    real_write = arcee.metrics.write_table

    def disk_full(rows, prefix):
        if str(prefix).startswith(str(tmp_path / "results")):
            raise OSError(28, "No space left on device")
        return real_write(rows, prefix)

    monkeypatch.setattr(arcee.metrics, "write_table", disk_full)
    spec = importlib.util.spec_from_file_location("evaluate_entry", ROOT / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    args = OmegaConf.load(ROOT / "configs" / "evaluate.yaml")
    for key in ("defaults", "hydra"):
        args.pop(key)
    args.update(samples=str(tmp_path / "s"), real=str(tmp_path / "s"), feature_extractor="test_metrics:Feats",
                resize=False, device="cpu", num_workers=0, cache_dir=str(tmp_path / "cache"),
                out=str(tmp_path / "results" / "table"))
    with pytest.raises(OSError, match="cannot write the table .*No space left on device.*it was written to") as e:
        evaluate.main(args)  # Hydra passes a given config straight to the function
    fallback = Path(str(e.value).split("it was written to ")[1].split(".json")[0])
    rows = json.loads(fallback.with_suffix(".json").read_text())
    assert len(rows) == 1 and rows[0]["num_samples"] == 8 and rows[0]["fid"] == pytest.approx(0, abs=1e-6)
    shutil.rmtree(fallback.parent)
