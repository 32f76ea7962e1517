"""Autograded exercises: source notebooks in otter-grader's format (`src/`), the learner's in-notebook check
(`feedback`), the instructor's release and grade commands (`python -m exercises release|grade`)."""
