"""pytest: nbval executes the exercise SOURCE notebooks (exercises/src, with their solutions) and nothing else
here: released student notebooks (exercises/_release, made by `python -m exercises release`) raise
NotImplementedError by design."""

collect_ignore_glob = ["_release/*", "_release/**/*"]
