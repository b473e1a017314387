"""Models in and out: extracting the smaller model (:mod:`.extraction`), saving and loading it
without its dense original (:mod:`.saved`), pretrained weights (:mod:`.pretrained`), and batch
norm folded into the conv before it for deployment (:mod:`.folding`)."""

from sap_jax.surgery.extraction import channel_scores, extract, kept_arch
from sap_jax.surgery.folding import FoldedBatchNorm, conv_bn_pairs, fold_bn, folded_batch_norms
from sap_jax.surgery.saved import CKPT_DIR, FORMAT, is_saved_model, load, read_info, save

__all__ = ["extract", "kept_arch", "channel_scores", "save", "load", "read_info",
           "is_saved_model", "FORMAT", "CKPT_DIR", "fold_bn", "conv_bn_pairs",
           "folded_batch_norms", "FoldedBatchNorm"]
