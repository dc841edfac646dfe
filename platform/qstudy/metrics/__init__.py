"""Caption metrics with pycocoevalcap: BLEU@4, METEOR, ROUGE-L and CIDEr(-D)."""

from qstudy.metrics.coco import CaptionScorer, ScorerProcessDied

__all__ = ["CaptionScorer", "ScorerProcessDied"]
