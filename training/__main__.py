"""python -m training {train,cv,list,aliases,promote,rollback,compare} -- the CLI behind `make train`.

`train --from-version NAME/VERSION` replays a published version's recorded config (training.replay).

Flags are generated from TrainConfig, so every setting has exactly one name and one default.
The registry commands are a thin layer over core.registry. Exit codes: 0 done, 2 an error (bad name,
missing or corrupt version, versions that cannot be compared), 3 refused by the registry (the champion
gate, or a rollback with no earlier holder).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

from core import artifacts, registry
from training.config import PRESETS, TrainConfig, make_config

DRY_RUN = {"limit_train": 1024, "limit_test": 512, "epochs": 1}


def _field_comments() -> dict[str, str]:
    """The comment beside each field in training/config.py: the help text has one source."""
    src = inspect.getsource(TrainConfig)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", src, re.M))


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    comments = _field_comments()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        args = typing.get_args(t)
        base = next((a for a in args if a is not type(None)), t) if args and type(None) in args else t
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        preset = ", model presets may change it" if any(f.name in v for v in PRESETS.values()) else ""
        helptext = (comments.get(f.name, "") + f" (default {default!r}").lstrip() + ")" + preset
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif base is dict:
            p.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=helptext)
        elif typing.get_origin(base) is tuple:
            p.add_argument(flag, type=float, nargs="+", default=None, help=helptext)
        else:
            p.add_argument(flag, type=base, default=None, help=helptext)
    p.add_argument("--dry-run", action="store_true",
                   help=f"tiny run for smoke tests: {', '.join(f'{k}={v}' for k, v in DRY_RUN.items())}")


def _config(ns: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if ns.dry_run:
        values = {**DRY_RUN, **{k: v for k, v in values.items() if v is not None}}
    return make_config(**values)


def _official_test_set(data_dir: str | None) -> registry.TestSet:
    """The official test images of a manifest's dataset, for versions published without stored predictions:
    from --data-dir, else the folder the version was trained from, else the default places."""
    cache: dict[str, tuple] = {}

    def test_set(manifest):
        from training.data import load_dataset

        d = manifest.dataset
        if d.name not in cache:
            folder = data_dir or (d.source if Path(d.source).is_dir() else None)
            ds = load_dataset(d.name, folder)
            cache[d.name] = (ds.test_x, ds.test_y)
        return cache[d.name]
    return test_set


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "none"
    return "< 1e-300" if p == 0 else f"{p:.3g}"


def _print_comparison(c: registry.Comparison) -> None:
    print(f"{c.name}: A {c.a} vs B {c.b} on the same {c.n} {c.dataset} test images "
          f"(predictions: A {c.predictions['a']}, B {c.predictions['b']})")
    print(f"  A correct          {c.a_correct:>6}  ({c.a_correct / c.n:.4f})")
    print(f"  B correct          {c.b_correct:>6}  ({c.b_correct / c.n:.4f})")
    print(f"  A right, B wrong   {c.a_right_b_wrong:>6}")
    print(f"  A wrong, B right   {c.a_wrong_b_right:>6}")
    print(f"  McNemar exact p    {_fmt_p(c.mcnemar_p):>6}")
    print(f"  B - A              {c.diff:+.4f}  (95% CI {c.diff_ci95[0]:+.4f} .. {c.diff_ci95[1]:+.4f}, paired)")
    print(f"verdict: {c.verdict} (alpha {c.alpha})")
    for note in c.notes:
        print(f"note: {note}")


def _registry_command(ns: argparse.Namespace) -> int:
    root, name = ns.artifacts_dir, ns.name
    if ns.command == "aliases":
        held = registry.aliases(root, name)
        if ns.json:
            print(json.dumps(held))
        elif not held:
            print(f"no aliases of {name} under {root} (set one: python -m training promote {name} VERSION)")
        else:
            print(f"{'alias':<12} {'version':<26} test_accuracy")
            for alias, version in held.items():
                try:
                    acc = f"{artifacts.read_manifest(artifacts.resolve(root, name, version)).metrics.test_accuracy:.4f}"
                except artifacts.ArtifactError as e:
                    acc = f"unreadable: {e}"
                print(f"{alias:<12} {version:<26} {acc}")
    elif ns.command == "compare":
        c = registry.compare(root, name, ns.a, ns.b, _official_test_set(ns.data_dir))
        if ns.json:
            print(json.dumps(c.to_dict()))
        else:
            _print_comparison(c)
    elif ns.command == "promote":
        rec = registry.promote(root, name, ns.version, ns.alias, ns.force, _official_test_set(ns.data_dir))
        if rec["from"] is None:
            how = "no holder before" + (": not gated" if ns.alias == registry.CHAMPION else "")
        elif rec["from"] == rec["to"]:
            how = "it already held it"
        elif rec["mcnemar_p"] is not None:
            how = (f"was {rec['from']}; McNemar p = {_fmt_p(rec['mcnemar_p'])}, {rec['to_correct']} vs "
                   f"{rec['from_correct']} correct of {rec['n']}")
        else:
            how = f"was {rec['from']}" + (f"; {rec['reason']}" if rec["reason"] else "; not gated")
        forced = " with --force" if rec["forced"] else ""
        print(f"promoted {name}/{ns.version} to {ns.alias}{forced} ({how})")
    elif ns.command == "rollback":
        rec = registry.rollback(root, name, ns.alias)
        print(f"rolled {ns.alias} of {name} back from {rec['from']} to {rec['to']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    # no abbreviations: a mistyped --epoch must be refused, not taken as --epochs
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", allow_abbrev=False, help="train a model and publish a new artifact version")
    _add_config_flags(p_train)
    p_train.add_argument("--from-version", metavar="NAME/VERSION", default=None,
                         help="rerun that version's recorded config on data with the recorded sha256 and publish a "
                              "new version; only --artifacts-dir and --data-dir may be given with it")
    p_cv = sub.add_parser("cv", allow_abbrev=False,
                          help="k-fold cross-validation on the training set; writes a report")
    _add_config_flags(p_cv)
    p_cv.add_argument("--folds", type=int, default=5)
    p_list = sub.add_parser("list", allow_abbrev=False, help="list published versions (* marks the promoted one)")
    p_list.add_argument("--artifacts-dir", default="artifacts")
    p_list.add_argument("name", nargs="?")
    p_alias = sub.add_parser("aliases", allow_abbrev=False, help="the aliases of a model and their versions")
    p_alias.add_argument("--artifacts-dir", default="artifacts")
    p_alias.add_argument("--json", action="store_true", help='print {"champion": VERSION, ...}')
    p_alias.add_argument("name")
    p_prom = sub.add_parser("promote", allow_abbrev=False,
                            help="point an alias at a version (champion, the served one, is gated against the "
                                 "current champion by a paired test); verifies the version first; logged")
    p_prom.add_argument("--artifacts-dir", default="artifacts")
    p_prom.add_argument("--alias", default=registry.CHAMPION, help="default champion: what the service serves")
    p_prom.add_argument("--force", action="store_true",
                        help="promote to champion even when significantly worse or not comparable (logged)")
    p_prom.add_argument("--data-dir", default=None,
                        help="test images for versions published without stored predictions")
    p_prom.add_argument("name")
    p_prom.add_argument("version")
    p_roll = sub.add_parser("rollback", allow_abbrev=False,
                            help="point an alias back at its previous holder by the promotion log; logged")
    p_roll.add_argument("--artifacts-dir", default="artifacts")
    p_roll.add_argument("--alias", default=registry.CHAMPION)
    p_roll.add_argument("name")
    p_cmp = sub.add_parser("compare", allow_abbrev=False,
                           help="paired comparison of two versions on the same test images (exact McNemar test)")
    p_cmp.add_argument("--artifacts-dir", default="artifacts")
    p_cmp.add_argument("--json", action="store_true")
    p_cmp.add_argument("--data-dir", default=None,
                       help="test images for versions published without stored predictions")
    p_cmp.add_argument("name")
    p_cmp.add_argument("a")
    p_cmp.add_argument("b")
    return parser


def _train_command(ns) -> int:
    original = None
    if ns.from_version:
        from training.replay import REPLAY_OVERRIDES, replay
        given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
                 if getattr(ns, f.name) is not None and f.name not in REPLAY_OVERRIDES]
        if given or ns.dry_run:
            raise ValueError(f"--from-version reruns the recorded config; only --artifacts-dir and "
                             f"--data-dir may be given with it, not {', '.join(given or ['--dry-run'])}")
        folder, original = replay(ns.from_version, ns.artifacts_dir or TrainConfig.artifacts_dir, ns.data_dir)
    else:
        from training.pipeline import train
        folder = train(_config(ns))
    m = artifacts.verify(folder)
    verdict, test = m.training.verdict, m.metrics
    cal = test.calibration
    print(f"calibration: temperature {cal.temperature:.4f}, test ECE {cal.ece:.4f} "
          f"({cal.ece_uncalibrated:.4f} at temperature 1); {cal.fitted_on}")
    print(f"fit: {verdict['verdict']} ({verdict['reason']})")
    print(f"published {folder}")
    print(f"test accuracy {test.test_accuracy:.4f} ({test.correct}/{test.n}), test loss {test.test_loss:.4f}, "
          f"trained in {m.training.training_seconds:.1f} s")
    if original is not None:
        same = m.weights_sha256 == original.weights_sha256
        print(f"replay of {m.training.replay_of}: weights_sha256 {m.weights_sha256[:16]}... "
              + ("identical to the original's" if same else
                 f"differs from the original's {original.weights_sha256[:16]}... (another device or "
                 "library versions? compare the manifests' device and libraries)"))
    return 0


def _cv_command(ns) -> int:
    from training.pipeline import cross_validate
    s = cross_validate(_config(ns), ns.folds)
    print(f"{s['folds']}-fold validation accuracy {s['mean_val_accuracy']:.4f} ± {s['sd_val_accuracy']:.4f}"
          f" (report in {s['report']})")
    return 0


def _list_command(ns) -> int:
    names = [ns.name] if ns.name else artifacts.list_names(ns.artifacts_dir)
    if not names:
        print(f"no versions under {ns.artifacts_dir}; run `make train`")
    for name in names:
        prom = artifacts.promoted(ns.artifacts_dir, name)
        held = registry.aliases(ns.artifacts_dir, name)
        for v in artifacts.list_versions(ns.artifacts_dir, name):
            m = artifacts.read_manifest(artifacts.resolve(ns.artifacts_dir, name, v))
            names_of_v = [a for a, held_v in held.items() if held_v == v]
            print(f"{'*' if v == prom else ' '} {name}/{v}  test_accuracy {m.metrics.test_accuracy:.4f}  "
                  f"{m.model.arch}  {m.created_at}" + (f"  ({', '.join(names_of_v)})" if names_of_v else ""))
    return 0


COMMANDS = {"train": _train_command, "cv": _cv_command, "list": _list_command}


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        return COMMANDS.get(ns.command, _registry_command)(ns)
    except (registry.GateRefused, registry.NothingToRollBack) as e:
        print(e if str(e).startswith("refused") else f"refused: {e}", file=sys.stderr)
        return 3
    except (ValueError, artifacts.ArtifactError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
