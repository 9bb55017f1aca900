"""Evaluation: CHAIR (with recall, precision and F1), POPE and CLAIR, on caption files from `neverfade caption`.

    from neverfade.eval import captions, chair, clair, pope
    runs = captions.load_runs("out/captions.jsonl")                      # one Captions per run in the file
    chair.evaluate(runs[0], chair.GroundTruth.from_coco("coco/annotations"))
    pope.score(pope.answer(captioner, pope.read_questions("coco_pope_popular.json"), "coco/val2014"))
    clair.evaluate(runs[0], clair.load_references("IIW-400/data.jsonl"), clair.Judge(url, "gpt-4o", key),
                   clair.AnswerCache("judge.jsonl"))

Each evaluate/score returns a JSON-ready dict: "overall" metrics (fractions), "ci" (95% bootstrap intervals over
images), and per-caption details. The command line is `neverfade eval chair | pope | clair` (commands/eval.py).
"""
