"""The paper table: trials ``qstudy evaluate`` scored on held-out data beside their val scores, in Markdown and LaTeX.

One row per trial as the captioning papers (Q-Adapter, VL-Adapter, ADEM-VL) print them: the
method, its trainable parameters (count and share of the base model), then BLEU@4, METEOR,
ROUGE-L and CIDEr on the validation split and on the held-out split, every score x100. Rows
run from the cheapest trial up. Imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from qstudy.analysis.report import StudySelection
from qstudy.records import HeldOutScores
from qstudy.tracking.schema import CAPTION_METRICS

MARKDOWN_FILE = "paper_table.md"
LATEX_FILE = "paper_table.tex"
METRIC_HEADERS = {"bleu4": "B@4", "meteor": "M", "rouge_l": "R", "cider": "C"}
MISSING = "-"  # a metric the trial did not measure (its run config turned METEOR off)
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _count(value: int) -> str:
    """A parameter count as papers print it: ``1.23M``, ``45.6K``."""
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f}M"
    return f"{value / 1_000:.1f}K" if value >= 1_000 else str(value)


def _score(scores: dict[str, float], name: str) -> str:
    return f"{100 * scores[name]:.1f}" if name in scores else MISSING


def _rows(selection: StudySelection) -> list[list[str]]:
    """Method, params, share of the base, four val scores, four held-out scores; cheapest first."""
    bases = {study.name: study.base_total_params for study in selection.studies}
    rows = []
    for scored in sorted(selection.held_out, key=lambda s: (s.record.trainable_params or 0, -(s.record.cider or 0))):
        record, base = scored.record, bases.get(scored.record.study)
        params = record.trainable_params
        share = f"{100 * params / base:.2f}%" if params is not None and base else MISSING
        rows.append([record.label, _count(params) if params is not None else MISSING, share,
                     *(_score(scored.val, name) for name in CAPTION_METRICS),
                     *(_score(scored.test, name) for name in CAPTION_METRICS)])
    return rows


def _held_out_note(held_out: tuple[HeldOutScores, ...]) -> str:
    settings = sorted({(scored.split, scored.beams) for scored in held_out}, key=str)
    described = "; ".join(f"split {split!r}, {beams if beams is not None else '?'} beam(s)"
                          for split, beams in settings)
    return (f"Test: {described}. Val: the study's validation split, the only scores trials were selected on. "
            "Scores x100.")


def _headers() -> list[str]:
    return ["Method", "Params", "% of base", *(f"val {METRIC_HEADERS[name]}" for name in CAPTION_METRICS),
            *(f"test {METRIC_HEADERS[name]}" for name in CAPTION_METRICS)]


def markdown_table(selection: StudySelection) -> str:
    """The table in Markdown (also what ``qstudy report`` prints), its note below it."""
    headers = _headers()
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---", *["---:"] * (len(headers) - 1)]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(selection)]
    return "\n".join([*lines, "", _held_out_note(selection.held_out)])


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(character, character) for character in text)


def latex_table(selection: StudySelection) -> str:
    """The table as a LaTeX ``table`` (booktabs), validation and test scores under their own headings."""
    scores = len(CAPTION_METRICS)
    metric_headers = " & ".join(METRIC_HEADERS[name] for name in CAPTION_METRICS)
    body = [" & ".join(_latex(cell) for cell in row) + r" \\" for row in _rows(selection)]
    return "\n".join([
        r"% Written by `qstudy report` (needs \usepackage{booktabs}).",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex(f'Study {selection.name}. ' + _held_out_note(selection.held_out))}}}",
        rf"\begin{{tabular}}{{lrr{'c' * scores}{'c' * scores}}}",
        r"\toprule",
        rf" & & & \multicolumn{{{scores}}}{{c}}{{Validation}} & \multicolumn{{{scores}}}{{c}}{{Test}} \\",
        rf"\cmidrule(lr){{4-{3 + scores}}}\cmidrule(lr){{{4 + scores}-{3 + 2 * scores}}}",
        rf"Method & Params & \% of base & {metric_headers} & {metric_headers} \\",
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]) + "\n"


def write_paper_tables(selection: StudySelection, out_dir: Path) -> list[Path]:
    """The Markdown and LaTeX tables in ``out_dir`` (none when no trial was scored on held-out data)."""
    if not selection.held_out:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, latex = out_dir / MARKDOWN_FILE, out_dir / LATEX_FILE
    markdown.write_text(markdown_table(selection) + "\n")
    latex.write_text(latex_table(selection))
    return [markdown, latex]
