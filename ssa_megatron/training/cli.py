"""``ssa-train RECIPE [key=value ...]``: the pretraining job (locally, under torchrun, or from SLURM).

RECIPE is a name in recipes/ (``tiny``, ``125m``, ``ssa_1b``, ``ssa_7b``, ``full_attn``, ``moba``) or a YAML path;
each ``section.key=value`` overrides one recipe value (``train.steps=20``, ``optim.betas=[0.9,0.99]``).
A run directory that already holds a checkpoint is resumed.

Expected errors -- a bad recipe or override (exit 2), missing or empty data, an unreadable checkpoint, a NaN/Inf in
training (exit 1) -- print one line naming what is wrong, and a hint; ``--debug`` shows their tracebacks. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ssa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=20")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--allow-changes", action="store_true",
                        help="resume although model/SSA settings differ from the run's recipe.yaml "
                             "(checkpoint.allow_changes=true)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of expected errors (bad recipe, data, checkpoint, NaN) too")
    return parser.parse_args(argv)


def _quiet_libraries(rank: int) -> None:
    # Megatron logs a deprecation notice per model build and Apex/TE absence at import; keep the console for
    # the job's own progress. Rank != 0 prints warnings and errors only.
    logging.basicConfig(level=logging.WARNING if rank else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("megatron", "megatron.core", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


CONFIG_HINT = "see `ssa-train RECIPE --print-recipe` for the resolved values; --debug shows the traceback"
RUNTIME_HINT = "--debug shows the traceback"


def one_line(err: BaseException) -> str:
    """The error's message on one line (the class name when it has none)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text or type(err).__name__


def report(err: BaseException, hint: str, rank: int) -> None:
    """One error line and one hint line on stderr (every rank: an error may be raised on one rank only)."""
    who = f"ssa-train: rank {rank}" if rank else "ssa-train"
    print(f"{who}: error: {one_line(err)}", file=sys.stderr)
    print(f"{who}: hint: {hint}", file=sys.stderr, flush=True)


def runtime_hint(err: BaseException) -> str:
    return getattr(err, "hint", None) or RUNTIME_HINT


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ssa_megatron.training import compile_caches

    compile_caches.configure()  # before torch.compile or Triton first read their cache variables
    rank = int(os.environ.get("RANK", 0))
    _quiet_libraries(rank)
    from ssa_megatron.config import load_recipe, to_dict

    try:
        recipe = load_recipe(args.recipe, args.overrides + ["checkpoint.allow_changes=true"] * args.allow_changes)
    except ValueError as err:
        if args.debug:
            raise
        report(err, CONFIG_HINT, rank)
        return 2
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
        return 0

    from ssa_megatron.data.shards import CorruptShardError
    from ssa_megatron.training.health import NonFiniteError
    from ssa_megatron.training.parallel import destroy_parallel
    from ssa_megatron.training.train import train

    # What a user can cause and fix: settings only checkable at start-up and data/checkpoint problems (ValueError,
    # which CheckpointError and data.documents.InputError are), files (OSError), unreadable shards, NaN/Inf.
    expected = (ValueError, OSError, CorruptShardError, NonFiniteError)

    if rank == 0:
        m = recipe.model
        print(f"ssa-train: recipe {recipe.name!r}: {m.num_layers} layers, hidden {m.hidden_size}, "
              f"{m.num_attention_heads}/{m.num_query_groups} heads, seq {m.seq_length}; SSA p_full {recipe.ssa.p_full}, "
              f"alpha {recipe.ssa.alpha}, K {recipe.ssa.top_k} x BS {recipe.ssa.block_size}; {recipe.train.steps} "
              f"steps of {recipe.train.global_batch_size} sequences; data {recipe.data.train_shards}; "
              f"run dir {recipe.train.run_dir}", flush=True)
    try:
        result = train(recipe)
    except expected as err:
        if args.debug:
            raise
        report(err, runtime_hint(err), rank)
        return 1
    finally:
        destroy_parallel()
    if result.already_finished:
        return 0  # train() said so in one line
    if rank == 0:
        print(f"ssa-train: done: steps {result.start_step}->{result.end_step} in {result.seconds:.0f} s; "
              f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}" if result.losses else
              f"ssa-train: done: no step ran ({result.start_step}->{result.end_step})")
        if result.eval:
            print("ssa-train: held-out " + ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in result.eval.items()))
        print(f"ssa-train: checkpoint: {result.checkpoint}")
        print(f"ssa-train: TensorBoard logs: {result.tensorboard_dir}  (tensorboard --logdir {result.tensorboard_dir})")
        if result.stopped_by_signal:
            print("ssa-train: stopped by a signal; run the same command again to resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
