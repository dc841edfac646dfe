"""Caption metrics with pycocoevalcap: BLEU@4, METEOR, ROUGE-L and CIDEr(-D) from one scorer.

METEOR runs a Java subprocess that costs seconds and ~1 GB to start, so one scorer keeps one
instance for a whole run and closes it deterministically (use it as a context manager).
"""

from __future__ import annotations

import contextlib

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

METRIC_NAMES = ("bleu4", "meteor", "rouge_l", "cider")


class ScorerProcessDied(RuntimeError):
    """A Java process of pycocoevalcap died while scoring: the machine's failure, not the run's.

    Killing a trial (its driver died, its node went away) kills these JVMs too, often a moment
    before the trial itself; what the trial then sees must not be recorded as its own error.
    """


class CaptionScorer:
    """Scores predicted captions against references, COCO-caption style (CIDEr on a 0-10 scale)."""

    def __init__(self, meteor: bool = True):
        self._tokenizer = PTBTokenizer()
        self._meteor = Meteor() if meteor else None

    def __enter__(self) -> "CaptionScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._meteor is not None:
            process = self._meteor.meteor_p
            with self._meteor.lock:
                process.kill()
                process.wait()
                with contextlib.suppress(OSError):  # a dead JVM's pipe may still hold unflushed bytes
                    process.stdin.close()
            self._meteor = None

    def score(self, predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
        """Corpus-level metrics over the clips in ``predictions``."""
        ids = sorted(predictions)
        # One tokenizer call for both sides: each call starts a JVM, and it tokenizes line by line.
        captions = {
            **{("hypothesis", i): [{"caption": predictions[i] or "<empty>"}] for i in ids},
            **{("reference", i): [{"caption": c} for c in references[i]] for i in ids},
        }
        tokenized = self._tokenizer.tokenize(captions)
        if len(tokenized) < len(captions):  # it reads the JVM's output line by line, and a dead JVM wrote none
            raise ScorerProcessDied(f"the PTB tokenizer's JVM returned {len(tokenized)} of {len(captions)} "
                                    "caption groups (it died)")
        # The PTB tokenizer drops an empty caption to nothing; scorers need one token at least.
        hypotheses = {i: [tokenized[("hypothesis", i)][0] or "<empty>"] for i in ids}
        refs = {i: tokenized[("reference", i)] for i in ids}
        bleu, _ = Bleu(4).compute_score(refs, hypotheses, verbose=0)
        scores = {
            "bleu4": bleu[3],
            "rouge_l": Rouge().compute_score(refs, hypotheses)[0],
            "cider": Cider().compute_score(refs, hypotheses)[0],
        }
        if self._meteor is not None:
            try:
                scores["meteor"] = self._meteor.compute_score(refs, hypotheses)[0]
            except (OSError, ValueError) as error:  # a broken pipe, or an empty line where a score was due
                if self._meteor.meteor_p.poll() is None:
                    raise
                self._meteor.lock.release()  # pycocoevalcap releases it only when scoring succeeds
                raise ScorerProcessDied(f"the METEOR JVM died (exit code {self._meteor.meteor_p.returncode})") from error
        return {name: float(scores[name]) for name in METRIC_NAMES if name in scores}
