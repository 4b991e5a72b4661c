"""arcee.metrics: FID / KID with clean-fid, a content-keyed reference-statistics cache, result tables."""
from .fid import (Evaluator, FeatureExtractor, build_feature_extractor, fid_from_feats, kid_from_feats,
                  model_features, reference_stats)
from .report import plot_fid_vs_step, write_table

__all__ = ["Evaluator", "FeatureExtractor", "build_feature_extractor", "reference_stats", "model_features",
           "fid_from_feats", "kid_from_feats", "write_table", "plot_fid_vs_step"]
