"""The assignments: one source notebook each (`exercises/src/NN_topic.ipynb`, otter-grader's format).

A question is declared in the source notebook by otter's raw cell `# BEGIN QUESTION` with its `name` (the function
the learner writes, a key of `exercises.questions.QUESTIONS`) and `points`; the notebook's stem is a key of
`exercises.questions.EXERCISES`, which lists the questions it may declare and what its sandbox may import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml

from exercises.questions import EXERCISES, QUESTIONS, Exercise, Question

SOURCE_DIR = Path(__file__).parent / "src"


@dataclass(frozen=True)
class Assignment:
    name: str  # the notebook's stem, e.g. "01_attention"
    path: Path
    questions: tuple[tuple[Question, float], ...]  # (question, points)
    exercise: Exercise


def names() -> list[str]:
    return sorted(p.stem for p in SOURCE_DIR.glob("*.ipynb"))


def load(name: str) -> Assignment:
    path = SOURCE_DIR / f"{name}.ipynb"
    if not path.is_file():
        raise ValueError(f"assignment: expected one of {names()}, got {name!r}")
    if name not in EXERCISES:
        raise ValueError(f"{path.name}: no entry {name!r} in exercises.questions.EXERCISES")
    exercise = EXERCISES[name]
    questions = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "raw" and cell.source.lstrip().startswith("# BEGIN QUESTION"):
            config = yaml.safe_load(cell.source.split("\n", 1)[1]) or {}
            if config.get("name") not in QUESTIONS or config["name"] not in exercise.questions:
                raise ValueError(f"{path.name}: question {config.get('name')!r} is not one of {name}'s "
                                 f"questions in exercises.questions.EXERCISES: {exercise.questions}")
            questions.append((QUESTIONS[config["name"]], float(config.get("points", 1))))
    if not questions:
        raise ValueError(f"{path.name}: no `# BEGIN QUESTION` cell")
    return Assignment(name, path, tuple(questions), exercise)
