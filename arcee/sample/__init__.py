"""arcee.sample: load generators, deterministic batched sampling, PNG folders and grids."""
from .generate import (ImageSampler, SamplerArgs, draw_inputs, export_npz, index_generator, make_grid, read_folder,
                       sample_folder, sample_grid, save_png)
from .loading import load_generator, read_step, save_generator

__all__ = ["load_generator", "save_generator", "read_step", "ImageSampler", "sample_folder", "sample_grid",
           "make_grid", "draw_inputs", "index_generator", "read_folder", "export_npz", "save_png", "SamplerArgs"]
