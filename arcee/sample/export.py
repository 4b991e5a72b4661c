"""Export a trained generator in the Hugging Face Hub layout (config.json + model.safetensors + model card).

    python -m arcee.sample.export runs/digits_xs/<date>_<time>/ema_final.safetensors exports/digits_xs
    python -m arcee.sample.export <ckpt> exports/digits_xs --push-to-hub <user>/digits_xs   # needs network + login
    python sample.py ckpt=exports/digits_xs out_dir=samples/digits num_samples=64            # or ckpt=<user>/digits_xs

`<ckpt>` is anything `sample.py` takes (a checkpoint folder: its EMA weights by default, an export,
a save_pretrained folder, a Hub id). In Python: `arcee.models.hub.ZigMaHub.from_pretrained(folder or id)`.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def export_pretrained(ckpt, out_dir, use_ema: bool = True, push_to_hub: str | None = None,
                      private: bool = False):
    """Load `ckpt` and `save_pretrained` it into `out_dir` (and push it to Hub repo `push_to_hub`).

    Returns the ZigMaHub model. The folder is written completely before anything is pushed.
    """
    from arcee.models.hub import ZigMaHub
    from arcee.sample.loading import load_generator

    model, cfg = load_generator(ckpt, use_ema=use_ema)
    hub = ZigMaHub.from_config(cfg)
    hub.load_state_dict(model.state_dict())
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"out_dir: {out_dir} exists and is not empty; choose a new folder")
    hub.save_pretrained(out_dir)
    if push_to_hub:
        from arcee.net import unreachable
        from huggingface_hub import constants

        why = unreachable(constants.ENDPOINT)
        if why:
            raise ConnectionError(f"--push-to-hub {push_to_hub}: the Hugging Face Hub cannot be reached ({why}); "
                                  f"the folder {out_dir} is written: upload it later with "
                                  f"`hf upload {push_to_hub} {out_dir}`")
        hub.push_to_hub(push_to_hub, private=private)
    return hub


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m arcee.sample.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint folder, .safetensors export, save_pretrained folder or Hub id")
    p.add_argument("out_dir", help="new folder for config.json + model.safetensors + README.md")
    p.add_argument("--raw", action="store_true", help="a checkpoint folder's raw weights instead of its EMA")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="also upload the folder to this Hub model repo (network and `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv=None) -> None:
    from arcee.errors import run_main

    a = parser().parse_args(argv)
    run_main(export_pretrained, a.ckpt, a.out_dir, not a.raw, a.push_to_hub, a.private, debug=a.debug, hint="--debug")
    print(f"wrote {a.out_dir} (config.json, model.safetensors, README.md)"
          + (f"; pushed to https://huggingface.co/{a.push_to_hub}" if a.push_to_hub else ""))
    print(f"next: python sample.py ckpt={a.out_dir} out_dir=samples/{Path(a.out_dir).name} num_samples=64")


if __name__ == "__main__":
    main()
