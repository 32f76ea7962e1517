"""Wrong answers to the exercises (tests/test_exercise_mutants.py): each must fail the visible check and lose
hidden points at every seed tried. `answers` holds plain PyTorch ones, `kernels` Triton ones; the common
mistakes each question names (`exercises.questions.MISTAKES`) are mutants too."""
