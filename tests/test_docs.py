"""The docs and recipes describe the project as it is: the generated config reference is current,
and scripts/paper_table.sh prints one train + sample + evaluate triple per paper row whose train
overrides compose and validate (no training, no GPU). Every experiment file composing on its own
is tested in tests/test_train.py (test_experiments_compose_and_validate)."""
import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

from test_train import cfg_of  # the compose helper of the training tests

from arcee.train import check_config

ROOT = Path(__file__).resolve().parents[1]
# REFERENCE.md section 6: Zigma-k and Zigma-k + Arcee (k = 1, 2, 4, 8), Vision Mamba with and without Arcee
PAPER_ROWS = {f"celebahq_{m}{s}" for m in ("zigma1", "zigma2", "zigma4", "zigma8", "vim") for s in ("", "_arcee")}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_current():
    gen = _load(ROOT / "scripts" / "gen_config_docs.py")
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert gen.render() == committed, "docs/configuration.md is stale: run python scripts/gen_config_docs.py"
    # every schema key and every group option is in it
    for key in ("train.batch_size", "train.fid_every", "optim.lr", "logger.mode"):
        assert f"`{key}`" in committed
    for yaml in (ROOT / "configs").glob("*/*.yaml"):
        assert f"`{yaml.stem}`" in committed, yaml


def _dry_run(*args) -> dict:
    """{row: [train argv, sample argv, evaluate argv]} from paper_table.sh --dry-run."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "paper_table.sh"), "--dry-run", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rows, row = {}, None
    for line in out.splitlines():
        if line.startswith("# "):
            row = line[2:]
            rows[row] = []
        elif line.strip():
            rows[row].append(shlex.split(line))
    rows.pop("table")
    return rows


def _after(argv, script):
    """The arguments after `script` (named by its path or its file name)."""
    i = next(k for k, a in enumerate(argv) if os.path.basename(a) == script)
    return argv[i + 1:]


def test_paper_table_dry_run_composes(tmp_path):
    data, real = tmp_path / "latents", tmp_path / "real"
    data.mkdir()
    rows = _dry_run("--data", str(data), "--real", str(real), "--gpus", "2", "--project", "proj",
                    "--runs", str(tmp_path / "runs"), "--", "train.compile=true")
    assert set(rows) == PAPER_ROWS
    for row, cmds in rows.items():
        assert len(cmds) == 3, (row, cmds)
        train, sample, evaluate = cmds
        assert train[:2] == ["accelerate", "launch"] and "--multi_gpu" in train
        assert train[train.index("--num_processes") + 1] == "2"
        overrides = _after(train, "train.py")
        assert f"experiment={row}" in overrides and "train.compile=true" in overrides
        cfg = cfg_of(*overrides, base=[])
        check_config(cfg, num_processes=2)
        assert (cfg.name, cfg.data.path, cfg.logger.project, cfg.train.compile) == (row, str(data), "proj", True)
        assert (cfg.model.width, cfg.model.depth, cfg.model.d_state, cfg.train.batch_size) == (
            768, 20 if "vim" in row else 24, 256, 192)  # Vim-B/2: depth 20 (the paper's Table 1)
        # sample the run's final EMA export, then score exactly that folder
        run_dir = dict(o.split("=", 1) for o in overrides)["hydra.run.dir"]
        s = dict(a.split("=", 1) for a in _after(sample, "sample.py"))
        assert s["ckpt"] == f"{run_dir}/ema_final.safetensors" and s["num_samples"] == "50000"
        e = dict(a.split("=", 1) for a in _after(evaluate, "evaluate.py"))
        assert e["samples"] == s["out_dir"] and e["real"] == str(real)


def test_paper_table_rejects_missing_args(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "paper_table.sh"), "--real", str(tmp_path), "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--data" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "scripts" / "paper_table.sh"), "--data", str(tmp_path), "--real",
                        str(tmp_path), "--rows", "celebahq_zigma3", "--gpus", "1", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "celebahq_zigma3" in r.stderr


def test_eval_checkpoint_dry_run(tmp_path):
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "NUM_GPUS": "1", "NUM_SAMPLES": "100",
           "EVALUATE_ARGS": "mode=legacy_tensorflow kid=false"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "eval_checkpoint.sh"), "runs/x/ema_final.safetensors",
                          str(tmp_path), "out/s", "sampler=heun"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    sample, evaluate = map(shlex.split, out)
    assert "--multi_gpu" not in sample and sample[-5:] == [
        "ckpt=runs/x/ema_final.safetensors", "out_dir=out/s", "num_samples=100", "batch_size=64", "sampler=heun"]
    assert evaluate[2:] == ["samples=out/s", f"real={tmp_path}", "out=out/s", "mode=legacy_tensorflow", "kid=false"]
