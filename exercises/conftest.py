"""pytest: nbval executes the exercise SOURCE notebooks (exercises/src, with their solutions) and nothing else
here: released student notebooks (exercises/_release, made by `python -m exercises release`) raise
NotImplementedError by design, and the solution key (exercises/_key, `release --key`) is those sources again."""

collect_ignore_glob = ["_release/*", "_release/**/*", "_key/*", "_key/**/*"]
