"""Entry point: ``deepspeed engine/train.py --method crd [--config configs/X.yaml] [key=value ...]``.

Also runs as ``python engine/train.py ...`` (one process) and under ``torchrun``. Without ``--config`` the testbed
recipe of the method is used (``configs/testbed_<method>.yaml``). ``--help`` lists every option with its default.
Config errors print one sentence and exit with code 2.
"""
import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USAGE = "deepspeed engine/train.py --method {crd,nft,...} [--config X.yaml] [key=value ...]"


def _help_text() -> str:
    from engine.config import help_lines
    from engine.methods import method_configs

    lines = [f"usage: {USAGE}", "",
             "  --method NAME     training method (default: crd; or the recipe's `method`)",
             "  --config FILE     YAML recipe (default: configs/testbed_<method>.yaml)",
             "  key=value ...     dotted overrides, e.g. train.micro_batch_size=4 crd.kl_beta=0",
             "", "options (key (type, default): meaning):"]
    lines += help_lines()
    for name, cls in sorted(method_configs().items()):
        lines.append(f"\n{name} options (section `{name}`, used with --method {name}):")
        lines += help_lines(cls, name)
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(usage=USAGE, add_help=False)
    p.add_argument("--method", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # set by the deepspeed launcher
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-")]
    if bad:
        raise SystemExit(f"config error: unknown option {bad[0]!r}; usage: {USAGE}")
    return args, rest


def main(argv=None) -> int:
    from engine.config import ConfigError, load_config

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(_help_text())
        return 0
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    try:
        path = args.config
        if path is None:
            method = args.method or "crd"
            path = os.path.join(_ROOT, "configs", f"testbed_{method}.yaml")
            if not os.path.isfile(path):
                path = None  # a method without a testbed recipe: dataclass defaults
        cfg = load_config(path, overrides, method=args.method)
        from engine.loop import train
        train(cfg)
        if cfg.eval.after_training and cfg.checkpoint.at_end:  # e.g. the testbed recipes' before/after table
            from engine.registry import import_path
            import_path(cfg.eval.after_training, "eval.after_training")(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the run's own failures with a one-line cause (traceback for anything else)
        from engine.checkpoint import CheckpointError
        from engine.methods.common import RewardFailure
        if isinstance(e, (CheckpointError, RewardFailure)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
