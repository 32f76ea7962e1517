"""The instructor's commands (see exercises/README.md):

    python -m exercises release [NAME ...] [--out DIR]
    python -m exercises release --key [NAME ...] [--out DIR]
    python -m exercises gradescope NAME [NAME ...] --out DIR [--seed N] [--visible-share S] [--allow-limits-only]
    python -m exercises grade ASSIGNMENT SUBMISSIONS_DIR OUT_DIR --seed N [--jobs J] [--memory-mb M] ...
"""

import argparse
import sys
import time
from pathlib import Path

from exercises import assignments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exercises")
    commands = parser.add_subparsers(dest="command", required=True)
    rel = commands.add_parser("release", help="write the student notebooks (solutions stripped) to a folder")
    rel.add_argument("names", nargs="*", help=f"assignments (default: all of {assignments.names()})")
    rel.add_argument("--out", type=Path, default=None,
                     help="folder (default: exercises/_release, with --key exercises/_key)")
    rel.add_argument("--key", action="store_true",
                     help="the solution key instead: the source notebooks with answers, executed, no markers")
    gs = commands.add_parser("gradescope", help="write a Gradescope autograder zip per assignment")
    gs.add_argument("names", nargs="+", metavar="NAME", help=f"assignments, of {assignments.names()}")
    gs.add_argument("--out", type=Path, required=True, help="folder for NAME-autograder.zip")
    gs.add_argument("--seed", type=int, default=None,
                    help="draws the hidden cases (default: a random one, printed; keep it private)")
    gs.add_argument("--memory-mb", type=int, default=3072, help="address-space limit per submission's sandbox")
    gs.add_argument("--visible-share", type=float, default=None,
                    help="share of each question's points on its visible cases, 0 to 1 (as for grade)")
    gs.add_argument("--allow-limits-only", action="store_true",
                    help="grade even where the sandbox has limits only (the submission could read the seed)")
    gr = commands.add_parser("grade", help="grade a folder of submitted notebooks, one per student")
    gr.add_argument("assignment", choices=assignments.names())
    gr.add_argument("submissions", type=Path, help="folder with one notebook per student (file name = id)")
    gr.add_argument("out", type=Path, help="folder for summary.csv, scores.csv, ids.csv and students/<id>/results.json")
    gr.add_argument("--seed", type=int, required=True, help="draws the hidden cases (keep it private)")
    gr.add_argument("--jobs", type=int, default=None, help="submissions graded at once (default: CPU count)")
    gr.add_argument("--memory-mb", type=int, default=3072, help="address-space limit per submission")
    gr.add_argument("--cell-timeout", type=float, default=60.0, help="seconds per notebook cell")
    gr.add_argument("--call-timeout-scale", type=float, default=1.0,
                    help="multiplies each question's per-call limit (10 s; 60 s for kernels, moe_forward, "
                         "mla_absorbed)")
    gr.add_argument("--visible-share", type=float, default=None,
                    help="share of each question's points on its visible cases, 0 to 1 (default: every case "
                         "weighs the same)")
    args = parser.parse_args(argv)

    if getattr(args, "visible_share", None) is not None and not 0.0 <= args.visible_share <= 1.0:
        parser.error(f"--visible-share: expected a number from 0 to 1, got {args.visible_share}")
    if args.command in ("release", "gradescope"):
        unknown = [name for name in args.names if name not in assignments.names()]
        if unknown:
            parser.error(f"NAME: expected names from {assignments.names()}, got {unknown}")
    if args.command == "gradescope":
        from exercises.gradescope import build_bundles
        written, seed = build_bundles(args.names, args.out, args.seed, allow_limits_only=args.allow_limits_only,
                                       memory_mb=args.memory_mb, visible_share=args.visible_share)
        print("\n".join(str(p) for p in written))
        print(f"seed {seed} is in every bundle (keep it private)", file=sys.stderr)
        return 0
    if args.command == "release":
        from exercises.key import DEFAULT_KEY_OUT, release_key
        from exercises.release import DEFAULT_OUT, ReleaseError, release
        try:
            if args.key:
                written = release_key(args.names or None, args.out or DEFAULT_KEY_OUT)
            else:
                written = release(args.names or None, args.out or DEFAULT_OUT)
        except ReleaseError as error:
            print(error, file=sys.stderr)
            return 1
        print("\n".join(str(p) for p in written))
        return 0

    from exercises.grade import Limits, grade
    if not args.submissions.is_dir():
        parser.error(f"SUBMISSIONS_DIR: expected a folder, got {args.submissions}")
    started = time.monotonic()
    limits = Limits(memory_mb=args.memory_mb, cell_timeout=args.cell_timeout,
                    call_timeout_scale=args.call_timeout_scale)
    reports = grade(args.assignment, args.submissions, args.out, args.seed, args.jobs, limits,
                    visible_share=args.visible_share)
    print(f"graded {len(reports)} submissions in {time.monotonic() - started:.0f} s; wrote {args.out}/summary.csv, "
          "scores.csv, ids.csv and students/<id>/results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
