"""What both accelerator checks share: their flags and their report (standard library only).

`device_check.py` (TensorFlow) and `jax_device_check.py` (Keras on JAX) time
the same configurations and check the same two properties; this module
parses their common flags and prints their table and checks.
"""

import argparse
import json

PRECISIONS = ("float32", "mixed_bfloat16")


def parse(description, configs, smoke_configs, default_warmup, argv=None):
    """The checks' flags: (configurations, precisions, steps, warmup, json path).

    Args:
      description: The script's one-line description.
      configs: The full run's (model, shape, B, K) configurations.
      smoke_configs: Those of --smoke.
      default_warmup: Warm-up steps of a full run.
      argv: The arguments (None: sys.argv).

    Returns:
      The parsed values; the parser exits with status 2 on bad flags.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds, any CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument(
        "--models", default=None, help="only these models (comma-separated), e.g. wrn16_4"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    for precision in precisions:
        if precision not in PRECISIONS:
            parser.error(f"--precisions: unknown {precision!r}; expected {PRECISIONS}")
    steps = (2 if args.smoke else 10) if args.steps is None else args.steps
    warmup = (1 if args.smoke else default_warmup) if args.warmup is None else args.warmup
    if min(steps, warmup) < 1:
        parser.error(f"--steps and --warmup: expected integers >= 1; received {steps}, {warmup}")
    chosen = smoke_configs if args.smoke else configs
    if args.models:
        chosen = tuple(c for c in chosen if c[0] in args.models.split(","))
        if not chosen:
            parser.error(f"--models: none of {args.models!r} is in this mode's configurations")
    return chosen, precisions, steps, warmup, args.json


def report(device, rows, checks, json_path=None) -> int:
    """Prints the checks (and writes everything as JSON); the exit status: 1 if one failed."""
    for c in checks:
        if c["check"] == "noise":
            detail = f"update std {c['measured']:.5g}, expected sigma*C/B = {c['expected']:.5g}"
        else:
            detail = f"moved {c['moved']:.5g}, bound lr*C/B = {c['bound']:.5g}"
        print(
            f"check {c['check']:<11} {c['precision']:<14} {detail}: {'ok' if c['ok'] else 'FAILED'}"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": device, "steps": rows, "checks": checks}, f, indent=2)
    return 0 if all(c["ok"] for c in checks) else 1
