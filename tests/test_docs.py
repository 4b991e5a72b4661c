"""The docs and recipes describe the project as it is: the generated config reference is current,
and scripts/paper_table.sh prints one train + sample + evaluate triple per paper row whose train
overrides compose and validate (no training, no GPU). Every experiment file composing on its own
is tested in tests/test_train.py (test_experiments_compose_and_validate)."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

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


# ----------------------------------------------------------------------------- the commands in the docs

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "scripts").glob("*.md"))]
ENTRY_POINTS = {"train.py": "config", "sample.py": "sample", "evaluate.py": "evaluate"}


def shell_commands(text: str, section: str | None = None) -> list[list[str]]:
    """The commands of the ```bash blocks of a markdown text (of one `## section` when given), as argv lists:
    comments dropped, backslash continuations joined, `a && b` split into two commands, and each
    `<placeholder>` (`<date>_<time>`, `<real PNG folder>`) replaced by the word PLACEHOLDER."""
    if section is not None:  # the section whose title starts with `section`
        text = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(re.sub(r"<[^<>]*>", "PLACEHOLDER", line), comments=True)
            while argv:
                cut = argv.index("&&") if "&&" in argv else len(argv)
                commands.append(argv[:cut])
                argv = argv[cut + 1:]
    return commands


def _script_args(argv: list[str]):
    """(script name, its arguments) for `python X.py ...`, `accelerate launch [opts] X.py ...`; else None."""
    for i, a in enumerate(argv):
        if a.endswith(".py") and (argv[0] in ("python", "accelerate") or i == 0):
            return a, argv[i + 1:]
    return None


def _compose(script: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(ENTRY_POINTS[os.path.basename(script)], overrides=overrides)


def test_every_documented_command_parses():
    """Each command of README.md, docs/*.md and scripts/*.md that names this repository's entry points: Hydra
    overrides compose (keys, groups, types), argparse CLIs accept their arguments, named scripts exist."""
    from data_prep.cli import parser as data_prep_parser

    from arcee.sample import export

    checked = 0
    for doc in DOCS:
        for argv in shell_commands(doc.read_text()):
            where = f"{doc.relative_to(ROOT)}: {shlex.join(argv)}"
            while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # NUM_GPUS=4 scripts/x.sh ...
                argv = argv[1:]
            found = _script_args(argv)
            if argv[:3] == ["python", "-m", "data_prep"]:
                data_prep_parser().parse_args(argv[3:])
            elif argv[:3] == ["python", "-m", "arcee.sample.export"]:
                export.parser().parse_args(argv[3:])
            elif found and os.path.basename(found[0]) in ENTRY_POINTS:
                script, args = found
                overrides = [a for a in args if "=" in a and not a.startswith("-")]
                if "-m" in args:  # a sweep: the first value of each comma list
                    overrides = [o.split("=", 1)[0] + "=" + o.split("=", 1)[1].split(",")[0] for o in overrides]
                cfg = _compose(script, overrides)
                if script.endswith("train.py") and "experiment" not in " ".join(overrides):
                    assert cfg.model and cfg.data, where
            elif found or argv[0].startswith("scripts/") or argv[0] == "sbatch":
                path = next(a for a in argv if a.startswith(("scripts/", "benchmarks/")) or a.endswith(".py"))
                assert (ROOT / path).is_file(), where
            else:
                continue
            checked += 1
    assert checked >= 45  # the docs name 52 today; a parsing slip would silently check none


TINY_ARGS = {  # appended to the README's commands: same code paths, seconds instead of minutes
    "train.py": ["logger=disabled", "model.width=32", "model.depth=2", "model.d_state=4", "model.num_orders=2",
                 "train.batch_size=8", "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2",
                 "train.sample_every=2", "train.sample_n=4", "train.sample_steps=2", "train.digits_check=8"],
    "sample.py": ["num_samples=8", "steps=2", "batch_size=8", "progress=false"],
    "evaluate.py": ["num_workers=0", "kid_subset_size=8", "out=eval"],
}


def test_readme_quickstart_runs_as_written(tmp_path):
    """The README's set-up and quickstart commands, run in order in a fresh folder with tiny overrides appended:
    `python train.py` writes the run folder the later lines name (<date>_<time> -> PLACEHOLDER_PLACEHOLDER)."""
    readme = (ROOT / "README.md").read_text()
    commands = shell_commands(readme, "Set-up") + shell_commands(readme, "Quickstart")
    cache = tmp_path / "arcee_cache"
    env = dict(os.environ, ARCEE_CACHE=str(cache), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    work = tmp_path / "work"
    work.mkdir()
    runs, outputs = 0, []
    for argv in commands:
        if argv[0] in ("pip", "pytest"):
            continue
        assert argv[0] == "python", argv
        argv = [a.replace("$HOME/.cache/arcee", str(cache)) for a in argv]
        script = os.path.basename(argv[1])
        cmd = [sys.executable, *argv[1:]]
        if script in ENTRY_POINTS:
            cmd[1] = str(ROOT / script)
            if not any(a.startswith("--") for a in argv):
                cmd += TINY_ARGS[script]
                if script == "train.py":
                    name = "PLACEHOLDER_PLACEHOLDER" if runs == 0 else f"r{runs}"  # the first: named by later lines
                    cmd.append(f"hydra.run.dir=runs/digits_xs/{name}")
                    runs += 1
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{shlex.join(argv)}\n{(p.stdout + p.stderr)[-3000:]}"
        outputs.append(p.stdout + p.stderr)
    assert runs >= 2 and len(outputs) >= 7
    first = next(o for o in outputs if "run folder:" in o)
    run_dir = "runs/digits_xs/PLACEHOLDER_PLACEHOLDER"
    assert f"run folder: {run_dir}" in first and "8 EMA samples: classifier FD" in first
    assert f"next: python sample.py ckpt={run_dir}/ema_final.safetensors out_dir=samples/digits_xs" in first
    assert (work / run_dir / "loss.png").is_file() and (work / run_dir / "samples" / "step_0000002.png").is_file()
    assert len(list((work / "samples" / "digits").glob("*.png"))) == 8
    assert (work / "eval.json").is_file() and (work / "exports" / "digits_xs" / "config.json").is_file()
    assert len(list((work / "samples" / "digits_hub").glob("*.png"))) == 8
