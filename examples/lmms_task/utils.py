"""lmms-eval task functions for a question file built by `build_task.py` (keep this file beside the YAML).

Each row holds the image (embedded bytes), the prompt text after the image (`question`, options included for
multiple choice), the accepted answers and the options (empty for exact-match questions). Scoring is the one
`vtprune eval` uses: exact match after normalisation, or the option letter the answer picks.
"""

from vtprune.apps.evaluation import Question


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answers"][0]


def process_results(doc, results):
    """{"exact_match": 1.0 or 0.0} for one answer (`results[0]`, the model's decoded text)."""
    prediction = results[0].strip()
    question = Question(image=None, question=doc["question"], answers=tuple(doc["answers"]),
                        choices=tuple(doc["choices"]) or None)
    return {"exact_match": float(question.correct(prediction))}
