"""Command line: run one preset and write its history JSON.

    python -m fedpara.run --preset fmnist-noniid --variant fedpara --profile smoke
    python -m fedpara.run --preset fmnist-personal --variant pfedpara --set rounds=20
    python -m fedpara.run --preset cifar10-noniid --variant fedpara --profile quick --resume
    python -m fedpara.run --list
    python -m fedpara.run --preset cifar10-iid --variant fedpara --write-run-config run.toml
        # then the same experiment through `flwr run`, one SuperNode per client (as it prints):
        # flwr run . --stream --run-config run.toml \
        #     --federation-config "num-supernodes=100 client-resources-num-cpus=1"

The history goes to results/<preset>/<variant>-<profile>.json (or --out); checkpoints to
checkpoints/<preset>/<variant>-<profile>/ unless `--set checkpoint_dir=...`. Relative folders
(these, data/ and --fake-data's) are the current directory's: run from the repository's root for
the book to find the history; the last line prints its full path. A run with changed
settings (`--set` of a field other than where and how it runs) is another experiment: its names
get `+field=value` for each change, e.g. results/fmnist-noniid/fedpara-full+rounds=5.json, so
it never overwrites the preset's own history or deletes its checkpoints. A bad config fails
before any data is loaded, with a message naming the field, and exit status 2. A run that cannot
start or finish (a missing or corrupt dataset, a download that fails, a checkpoint from another
experiment or one that does not read back, a file that cannot be written) prints one paragraph
to stderr: what went wrong, where, and the step that fixes it; exit status 1. `--verbose` adds
the traceback.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import traceback
from pathlib import Path

from fedpara.config import PRESETS, PROFILES, ExperimentConfig, get_preset, parse_overrides
from fedpara.history import History
from fedpara.storage import check_writable, write_atomic

FAKE_DIR = Path("_build") / "fake-data"  # where --fake-data writes, as the chapters do


class _OneName(argparse.Action):
    """--variant and its aliases: --parameterization fedpara --algorithm fedper reads like two
    settings but would keep only the last; mixing the names is refused (repeating one name
    keeps the last, as argparse does)."""

    def __call__(self, parser, namespace, values, option_string=None):
        first = getattr(namespace, "_variant_option", None)
        if first not in (None, option_string):
            parser.error(f"{first} {getattr(namespace, self.dest)} and {option_string} {values}: "
                         f"{', '.join(self.option_strings)} are one setting, the preset's "
                         f"variant; give one (--list shows each preset's variants)")
        namespace._variant_option = option_string
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedpara.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--variant", "--parameterization", "--algorithm", dest="variant",
                   action=_OneName,
                   help="what the preset compares, e.g. original/lowrank/fedpara for the "
                        "FedAvg presets, fedavg/fedper/pfedpara/local for the personalization "
                        "ones (default: the preset's first; --list shows each preset's)")
    p.add_argument("--profile", default="full", choices=PROFILES)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set rounds=5 --set device=cpu")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--fake-data", action="store_true",
                   help="smoke profile of a CIFAR or FEMNIST preset only: write tiny fake files "
                        f"in the real formats to {FAKE_DIR}/ and run on them (data, results "
                        "and checkpoints all under that folder), as the chapters' smoke runs do")
    p.add_argument("--verbose", action="store_true",
                   help="show Flower's and Ray's logs, and the traceback of an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, help="history JSON path (default: under --results-dir)")
    p.add_argument("--results-dir", type=Path,
                   help="folder of the history JSONs (default: the config's results_dir, "
                        "'results'); also what --write-run-config writes as results-dir")
    p.add_argument("--write-run-config", type=Path, metavar="TOML",
                   help="write the config as a `flwr run --run-config` file and exit")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    return p


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The preset with its overrides; checkpoints default to checkpoints/<preset>/<name>."""
    overrides = parse_overrides(args.overrides)
    config = get_preset(args.preset, variant=args.variant, profile=args.profile, **overrides)
    base = Path()
    if getattr(args, "fake_data", False):
        from fedpara.results import FAKE_DATA_WRITERS

        if args.profile != "smoke" or config.dataset not in FAKE_DATA_WRITERS:
            raise ValueError(f"--fake-data is for the smoke profile of a preset on "
                             f"{', '.join(FAKE_DATA_WRITERS)} (the fake sets are tiny); got "
                             f"--profile {args.profile} on {config.dataset}")
        if "data_dir" in overrides:
            raise ValueError("--fake-data writes and uses its own data folder; leave out "
                             "--set data_dir")
        base = FAKE_DIR  # data, results and checkpoints apart from real runs'
        config = config.replace(data_dir=str(FAKE_DIR))
        if "results_dir" not in overrides:
            config = config.replace(results_dir=str(FAKE_DIR / "results"))
    if "checkpoint_dir" not in overrides:
        config = config.replace(checkpoint_dir=str(base / "checkpoints" / config.preset
                                                   / config.run_name))
    if args.results_dir is not None:  # one folder, whether this CLI or `flwr run` saves
        if "results_dir" in overrides and Path(overrides["results_dir"]) != args.results_dir:
            raise ValueError(f"--results-dir {args.results_dir} and --set results_dir="
                             f"{overrides['results_dir']} disagree; give one of them")
        config = config.replace(results_dir=str(args.results_dir))
    return config


def _toml(key: str, value, pair: bool = False) -> str:
    """`value` as a TOML value. Strings are TOML basic strings, escaped as JSON escapes them
    (backslashes, quotes, control characters), which TOML reads the same. Flower's parser of
    key=value pairs takes a double-quoted value only up to its next `"`, so there a string with
    a `"` is written as a TOML literal string ('...', no escapes), if it can be."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return repr(value)
    if pair and '"' in value:
        if "'" in value or any(c < " " or c == "\x7f" for c in value):
            raise ValueError(f"{key}={value!r} holds both kinds of quote (or a control "
                             f"character), which Flower's key=value pairs cannot carry; write "
                             f"the config to a file instead (--write-run-config)")
        return f"'{value}'"
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_run_config(config: ExperimentConfig, path: Path, *, resume: bool = False) -> None:
    """A TOML file of Flower run-config overrides (kebab-case keys), written atomically;
    `resume` adds the ServerApp's `resume = true`. Flower reads `--run-config X` as a file only
    when X ends in `.toml` (else as key=value pairs), so another name is refused."""
    _check_run_config_name(path)
    values = {**config.to_run_config(), **({"resume": True} if resume else {})}
    lines = [f"{key} = {_toml(key, value)}" for key, value in values.items()]
    write_atomic(path, ("\n".join(lines) + "\n").encode())


def _check_run_config_name(path: Path) -> None:
    if Path(path).suffix != ".toml":
        raise ValueError(f"--write-run-config {path}: the name must end in .toml; `flwr run "
                         f"--run-config` reads any other name as key=value pairs, not a file")


def run_config_pairs(config: ExperimentConfig, without: tuple[str, ...] = ()) -> str:
    """The config as `flwr run --run-config "<pairs>"` takes it: key=value pairs, TOML values
    (a TOML file cannot be combined with other pairs on Flower's command line), leaving out the
    run-config keys in `without` (a key may appear only once)."""
    return " ".join(f"{key}={_toml(key, value, pair=True)}"
                    for key, value in config.to_run_config().items() if key not in without)


class RunFailure(Exception):
    """A run that cannot go on; the message says what went wrong, where, and how to fix it."""


def check_checkpoint(config: ExperimentConfig) -> str:
    """For --resume: the checkpoint it would start from reads back and is from this experiment.
    Returns what the run will do, for the user ("resuming after round N from ...").

    Checked here, before Ray starts: inside the simulation the same error would end the run
    with Flower's log instead of this message.
    """
    from fedpara.checkpoints import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(config.checkpoint_dir)
    if path is None:
        _check_resumable_elsewhere(config)
        return f"no checkpoint in {config.checkpoint_dir}: starting from round 1"
    try:
        state = load_checkpoint(path, config)
    except ValueError as err:  # another experiment's, or past `rounds`
        raise RunFailure(
            f"cannot resume: {err}.\n"
            f"To fix it: resume with the settings that run used (the fields named above), or "
            f"give this run its own folder with --set checkpoint_dir=..., or run without --resume "
            f"to start afresh (that deletes the round-*.pt files in {config.checkpoint_dir})."
        ) from err
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
        raise RunFailure(
            f"cannot resume: the checkpoint {path} does not read back, it is corrupt or "
            f"truncated ({err!r}).\n"
            f"To fix it: delete {path} to resume from the checkpoint before it, or run without "
            f"--resume to start afresh."
        ) from err
    if state["round"] == config.rounds:
        return f"{path} is of the last round, {config.rounds}: nothing left to train"
    return f"resuming after round {state['round']} of {config.rounds} from {path}"


def _check_resumable_elsewhere(config: ExperimentConfig) -> None:
    """--resume with a `rounds` of its own finds its default folder empty (the folder is named
    after the rounds): a checkpoint this run may continue, in a folder of the same preset,
    variant and profile named after other rounds, is named with the flag that resumes it."""
    from fedpara.checkpoints import latest_checkpoint, load_checkpoint

    folder = Path(config.checkpoint_dir)
    stem = f"{config.variant_name}-{config.profile}"
    found = []
    for other in sorted(folder.parent.glob(f"{stem}*")):
        if other == folder or not (other.name == stem or other.name.startswith(stem + "+")):
            continue
        path = latest_checkpoint(other)
        try:
            state = load_checkpoint(path, config) if path is not None else None
        except (ValueError, OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError):
            continue
        if state is not None:
            found.append(f"--set checkpoint_dir={other} (round {state['round']})")
    if found:
        raise RunFailure(
            f"--resume: {folder} holds no checkpoint, but this experiment's run can be "
            f"continued from another folder (a folder is named after its run's rounds).\n"
            f"To fix it: resume with {' or '.join(found)}; or run without --resume to start "
            f"afresh in {folder}.")


def _failure(err: BaseException) -> str | None:
    """One paragraph for stderr (what went wrong and where, and the step that fixes it), or
    None for an error that is not one of the expected ones (a bug: keep its traceback)."""
    from fedpara.checkpoints import ForeignCheckpoints
    from fedpara.data import DataUnavailableError
    from fedpara.storage import NotWritableError
    from fedpara.task import SplitError

    if isinstance(err, RunFailure | DataUnavailableError | NotWritableError):  # with their fix
        return f"error: {err}"
    if isinstance(err, SplitError):  # run_experiment's check, before Ray starts
        return (f"error: cannot start: {str(err).rstrip('.')}.\nTo fix it: choose another split "
                f"with --set (partition, num_clients, alpha or shards_per_client).")
    if isinstance(err, ForeignCheckpoints):  # run_experiment's check, before Ray starts
        return (f"error: cannot start: {err}.\nTo fix it: run with --set checkpoint_dir=<another "
                f"folder> (without it, each preset and each change of settings has a folder of "
                f"its own), or resume that experiment with its own settings and --resume.")
    return None


def _writable(write, path: Path) -> None:
    """Run `write()`, turning an OSError (a missing folder, no permission) into a RunFailure."""
    try:
        write()
    except OSError as err:
        raise RunFailure(
            f"cannot write {path}: {err.strerror or err}.\nTo fix it: check that this path "
            f"exists and can be written (or choose another one), then run again.") from err


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:18s} variants: {', '.join(preset.variants):32s} {preset.description}")
        return 0
    if not args.preset:
        _parser().error("--preset is required (see --list)")
    try:
        if args.write_run_config and args.out:
            raise ValueError("--out cannot go into a run-config file: `flwr run` saves the "
                             "history under results_dir (give --results-dir instead)")
        if args.write_run_config:
            _check_run_config_name(args.write_run_config)
        config = build_config(args)
        if not args.write_run_config:  # that file may be meant for another machine
            from fedpara.experiment import check_machine

            check_machine(config)
    except ValueError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}\nFix the --preset, --variant or --set value it names "
              f"(--list shows the presets and their variants).", file=sys.stderr)
        return 2
    try:
        return _run(config, args)
    except Exception as err:
        message = _failure(err)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else "\n(--verbose shows the traceback.)"
        print(message + hint, file=sys.stderr)
        return 1


def _run(config: ExperimentConfig, args: argparse.Namespace) -> int:
    if args.fake_data:  # also for a run-config file: `flwr run` reads the same folder
        from fedpara.results import write_fake_data

        write_fake_data([config.dataset], config.data_dir, config.seed)
    if args.write_run_config:
        resume = {"resume": True} if args.resume else {}
        _writable(lambda: write_run_config(config, args.write_run_config, **resume),
                  args.write_run_config)
        print(f"wrote {args.write_run_config}; run it on the local simulation federation (one "
              f"SuperNode per client; docs/flower.md has the environment it needs) with:\n"
              f"  flwr run . --stream --run-config {args.write_run_config} --federation-config "
              f"\"num-supernodes={config.num_clients} client-resources-num-cpus=1\"")
        return 0

    from fedpara.experiment import run_experiment

    if args.resume:
        if not config.checkpoint_dir:
            raise RunFailure("--resume needs the folder of the checkpoints.\nTo fix it: add "
                             "--set checkpoint_dir=<folder> (the one the run wrote to).")
        print(check_checkpoint(config), file=sys.stderr)
    path = Path(args.out or History.default_path(config, config.results_dir))
    check_writable(path.parent, "the folder of --out" if args.out  # now, not after the run
                   else "the history's folder under results_dir")
    history = run_experiment(config, resume=args.resume, verbose=args.verbose,
                             progress=not args.no_progress)
    _writable(lambda: history.save(path), path)
    last = history.records[-1]
    print(f"{config.preset}/{config.variant_name} ({config.profile}): {len(history)} rounds, "
          f"accuracy {last.accuracy:.4f}, {last.cum_bytes / 2**30:.4f} GiB, "
          f"{history.wall_seconds:.0f} s of rounds -> {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
